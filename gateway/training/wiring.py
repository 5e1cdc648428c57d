"""Build a gateway's training jobs: files under ``data_dir/training``, records in the gateway
database, micro-steps on the engine thread, results registered in the registry, metrics."""

from __future__ import annotations

from pathlib import Path

from adapters.errors import AdapterConflictError
from adapters.kinds.base import AdapterLimits
from gateway.training.artifacts import JobArtifacts
from gateway.training.jobs import TrainingJobs, TrainingLimits
from gateway.training.metrics import register_training_metrics
from gateway.training.shared_files import SharedJobFiles
from gateway.training.store import SqliteTrainingJobStore

MAX_LINE_BYTES = 1 << 20


def attach_training(gateway, database: Path) -> TrainingJobs:
    settings = gateway.settings

    async def register(adapter_id: str, folder: Path) -> str:
        entry = await gateway.registry.register(adapter_id, folder, replace=False)
        return entry.id

    async def unregister(adapter_id: str) -> None:
        await gateway.registry.delete(adapter_id)

    def check_adapter_id(adapter_id: str) -> None:
        gateway.registry.check_id(adapter_id)  # pattern, and names taken by the base or an experiment
        if adapter_id in gateway.registry:
            raise AdapterConflictError(f"the adapter {adapter_id!r} is already registered; choose another adapter_id")

    limits = TrainingLimits(
        max_dataset_bytes=settings.max_training_dataset_bytes, max_dataset_lines=settings.max_training_dataset_lines,
        max_line_bytes=MAX_LINE_BYTES, max_queued_jobs=settings.max_training_jobs,
        context_window=gateway.base.context_window,
        adapter=AdapterLimits(max_lora_rank=settings.max_lora_rank, max_virtual_tokens=settings.max_virtual_tokens,
                              max_adapter_bytes=settings.max_adapter_bytes))
    # with a shared store, datasets, checkpoints and results are copied there: any replica can resume
    shared = SharedJobFiles(gateway.shared_store) if gateway.shared_store is not None else None
    jobs = TrainingJobs(runtime=gateway.runtime, tokenizer=gateway.base.tokenizer,
                        store=SqliteTrainingJobStore(database),
                        artifacts=JobArtifacts(settings.data_dir / "training",
                                               settings.training_artifact_retention_seconds, shared=shared),
                        limits=limits, register=register, unregister=unregister, check_adapter_id=check_adapter_id,
                        duty_cycle=settings.training_duty_cycle, read_adapter=gateway.registry.read_weights)
    gateway.engine.set_background(jobs.background)
    register_training_metrics(gateway.metrics.registry, jobs)
    return jobs
