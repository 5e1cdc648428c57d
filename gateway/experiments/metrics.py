"""Prometheus collectors labelled by experiment and arm, on the registry the app hands in."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

# seconds; from a few tokens on a GPU to long CPU generations
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class ExperimentMetrics:
    def __init__(self, registry: CollectorRegistry):
        labels = ("experiment", "arm")
        self.requests = Counter(
            "gateway_experiment_requests", "Requests routed by an experiment, by arm and outcome "
            "(ok, error, cancelled).", (*labels, "outcome"), registry=registry)
        self.latency = Histogram(
            "gateway_experiment_latency_seconds", "Request latency of an experiment's arm (completed requests).",
            labels, buckets=LATENCY_BUCKETS, registry=registry)
        self.ttft = Histogram(
            "gateway_experiment_time_to_first_token_seconds", "Time to the first text of an experiment's arm.",
            labels, buckets=LATENCY_BUCKETS, registry=registry)
        self.feedback = Counter(
            "gateway_experiment_feedback", "Requests of an experiment's arm that received feedback, by the "
            "thumbs of their first feedback (up, down, none: a score only); feedback sent again for the same "
            "request replaces the earlier one and is not counted again.", (*labels, "thumbs"), registry=registry)
        self.captures_dropped = Counter(
            "gateway_experiment_captures_dropped", "Captured prompts and answers not kept, by reason: evicted "
            "(waited in memory for feedback past the pending limits), limit (the experiment holds the most "
            "captures it may store).", ("experiment", "reason"), registry=registry)

    def observe_request(self, experiment: str, arm: str, outcome: str, ttft_s: float | None,
                        latency_s: float | None) -> None:
        self.requests.labels(experiment, arm, outcome).inc()
        if ttft_s is not None:
            self.ttft.labels(experiment, arm).observe(ttft_s)
        if latency_s is not None and outcome == "ok":
            self.latency.labels(experiment, arm).observe(latency_s)

    def observe_feedback(self, experiment: str, arm: str, thumbs: str | None, replaced: bool = False) -> None:
        # a counter cannot move a vote from one label to another; counting replacements too would let
        # one client inflate it at will, so each request counts once, with its first feedback
        if not replaced:
            self.feedback.labels(experiment, arm, thumbs or "none").inc()

    def capture_dropped(self, experiment: str, reason: str) -> None:
        self.captures_dropped.labels(experiment, reason).inc()

    def forget(self, experiment: str, arms: list[str]) -> None:
        """Drop a deleted experiment's series (a later experiment may reuse the name)."""
        for arm in arms:
            for outcome in ("ok", "error", "cancelled"):
                _remove(self.requests, experiment, arm, outcome)
            for thumbs in ("up", "down", "none"):
                _remove(self.feedback, experiment, arm, thumbs)
            _remove(self.latency, experiment, arm)
            _remove(self.ttft, experiment, arm)
        for reason in ("evicted", "limit"):
            _remove(self.captures_dropped, experiment, reason)


def _remove(metric, *labels: str) -> None:
    try:
        metric.remove(*labels)
    except KeyError:  # the series was never created
        pass
