"""Build a gateway's training jobs: files under ``data_dir/training``, records in the gateway's
job store (``shared``: other replicas claim jobs from it too), micro-steps on the engine thread,
results registered in the registry, metrics."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from pathlib import Path

from adapters.blobs import content_hash
from adapters.errors import AdapterConflictError
from adapters.kinds.base import AdapterLimits
from gateway.training.artifacts import JobArtifacts
from gateway.training.jobs import TrainingJobs, TrainingLimits
from gateway.training.metrics import register_training_metrics
from gateway.training.shared_files import SharedJobFiles
from gateway.training.store import TrainingJobStore

log = logging.getLogger(__name__)
MAX_LINE_BYTES = 1 << 20


def attach_training(gateway, store: TrainingJobStore, *, shared: bool = False) -> TrainingJobs:
    settings = gateway.settings

    async def register(adapter_id: str, folder: Path) -> str:
        try:
            entry = await gateway.registry.register(adapter_id, folder, replace=False)
        except AdapterConflictError:
            # a job resumed after a crash between its registration and its success being saved:
            # the adapter with the very same files is its own, registered already
            registered = gateway.registry.get(adapter_id) if adapter_id in gateway.registry else None
            if registered is not None and \
                    registered.record.content_hash == await asyncio.to_thread(content_hash, folder):
                log.info("adapter %s: already registered with this job's files (a resumed job)", adapter_id)
                return adapter_id
            raise
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
        max_piece_tokens=settings.training_piece_tokens_for(gateway.base.device),
        adapter=AdapterLimits(max_lora_rank=settings.max_lora_rank, max_virtual_tokens=settings.max_virtual_tokens,
                              max_adapter_bytes=settings.max_adapter_bytes))
    # with a shared store, datasets, checkpoints and results are copied there: any replica can resume
    job_files = SharedJobFiles(gateway.shared_store) if gateway.shared_store is not None else None
    jobs = TrainingJobs(runtime=gateway.runtime, tokenizer=gateway.base.tokenizer,
                        store=store,
                        artifacts=JobArtifacts(settings.data_dir / "training",
                                               settings.training_artifact_retention_seconds, shared=job_files),
                        limits=limits, register=register, unregister=unregister, check_adapter_id=check_adapter_id,
                        duty_cycle=settings.training_duty_cycle, read_adapter=gateway.registry.read_weights,
                        owner=f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}", shared=shared,
                        lease_seconds=settings.training_lease_seconds, poll_seconds=settings.database_resync_seconds)
    gateway.engine.set_background(jobs.background)
    register_training_metrics(gateway.metrics.registry, jobs)
    return jobs
