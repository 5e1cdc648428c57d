"""Prometheus view of the training jobs, read from the job records at scrape time (so nothing
goes stale): jobs by state, tokens/s and current loss of each running job (at most one runs
at a time, so the ``job`` label stays bounded), and failed writes of job records."""

from __future__ import annotations

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from gateway.training.store import RUNNING, STATES


class TrainingCollector:
    def __init__(self, jobs) -> None:
        self.jobs = jobs

    def describe(self):
        return []  # collected lazily; describing would call collect() at registration

    def collect(self):
        records = self.jobs.list()
        by_state = GaugeMetricFamily("gateway_training_jobs", "Training jobs by state.", labels=["state"])
        for state in STATES:
            by_state.add_metric([state], sum(1 for r in records if r.state == state))
        speed = GaugeMetricFamily("gateway_training_tokens_per_second",
                                  "Training throughput of each running job (tokens of micro-batches per second).",
                                  labels=["job"])
        loss = GaugeMetricFamily("gateway_training_loss", "Latest training loss of each running job.", labels=["job"])
        for record in records:
            if record.state != RUNNING:
                continue
            progress = record.progress
            speed.add_metric([record.id], float(progress.get("tokens_per_second") or 0.0))
            history = progress.get("train_loss") or []
            if history:
                loss.add_metric([record.id], float(history[-1][1]))
        store_errors = CounterMetricFamily(
            "gateway_training_store_errors", "Failed writes of training job records (disk full, database locked).")
        store_errors.add_metric([], self.jobs.writer.errors)
        unsaved = GaugeMetricFamily(
            "gateway_training_unsaved_jobs", "Training jobs whose latest state is not saved yet (retried; no job "
            "starts meanwhile).")
        unsaved.add_metric([], self.jobs.writer.unsaved)
        scheduler = CounterMetricFamily("gateway_training_scheduler_errors",
                                        "Unexpected errors the training job scheduler survived.")
        scheduler.add_metric([], self.jobs.scheduler_errors)
        yield from (by_state, speed, loss, store_errors, unsaved, scheduler)


def register_training_metrics(registry: CollectorRegistry, jobs) -> TrainingCollector:
    collector = TrainingCollector(jobs)
    registry.register(collector)
    return collector
