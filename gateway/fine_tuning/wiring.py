"""Build a gateway's files and fine-tuning API: files under ``data_dir/files``, records in the
gateway's file store, jobs in the gateway's one training job store, ``ft:`` names served."""

from __future__ import annotations

from gateway.files.service import FileLimits, FileService
from gateway.files.store import SqlFileStore
from gateway.fine_tuning.service import FineTuning
from gateway.training.wiring import MAX_LINE_BYTES

FILES_DIR = "files"


def attach_fine_tuning(gateway, store: SqlFileStore) -> tuple[FileService, FineTuning]:
    settings = gateway.settings
    limits = FileLimits(max_bytes=settings.max_training_dataset_bytes, max_lines=settings.max_training_dataset_lines,
                        max_line_bytes=MAX_LINE_BYTES, max_files=settings.max_files)
    files = FileService(settings.data_dir / FILES_DIR, store, limits,
                        shared=gateway.shared_store)  # None: the bytes stay in the data dir
    def describe(adapter_id: str) -> dict | None:
        if adapter_id not in gateway.registry:
            return None
        entry = gateway.registry.get(adapter_id)
        return {"kind": entry.record.kind, "num_virtual_tokens": entry.virtual_tokens}

    fine_tuning = FineTuning(gateway.training, files, gateway.service.base_name, describe=describe)
    files.in_use = fine_tuning.in_use
    gateway.service.model_aliases = fine_tuning.resolve
    return files, fine_tuning
