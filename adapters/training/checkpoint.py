"""Training checkpoints: tensors in safetensors, everything else in JSON (never pickle).

Layout under a job's checkpoint folder::

    checkpoint-00000050/state.safetensors   adapter parameters, optimizer moments, RNG state
    checkpoint-00000050/state.json          step counters, histories, optimizer hyperparameters
    LATEST                                  name of the newest complete checkpoint

A checkpoint is written into a temporary folder, flushed, renamed into place, and only then named
in ``LATEST`` (itself replaced atomically), so a crash at any point leaves the previous checkpoint
usable. Older checkpoints are removed after the pointer moves.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from adapters import faults

LATEST = "LATEST"
TENSORS = "state.safetensors"
STATE = "state.json"


class CheckpointError(Exception):
    """A checkpoint exists but cannot be used; the message says why."""


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def save_checkpoint(folder: Path, step: int, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    name = f"checkpoint-{step:08d}"
    tmp = folder / (name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / TENSORS),
              metadata={"format": "pt"})
    faults.hit("checkpoint.write")
    (tmp / STATE).write_text(json.dumps(state))
    for path in (tmp / TENSORS, tmp / STATE):
        _fsync_file(path)
    final = folder / name
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    pointer = folder / (LATEST + ".tmp")
    pointer.write_text(name)
    _fsync_file(pointer)
    os.replace(pointer, folder / LATEST)
    for old in folder.glob("checkpoint-*"):
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_latest(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """The newest complete checkpoint as ``(tensors, state)``, or None when there is none."""
    pointer = folder / LATEST
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    target = folder / name
    if not name.startswith("checkpoint-") or not (target / TENSORS).is_file() or not (target / STATE).is_file():
        raise CheckpointError(f"the latest checkpoint {name!r} is incomplete")
    try:
        return load_file(str(target / TENSORS)), json.loads((target / STATE).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"the latest checkpoint {name!r} cannot be read: {exc}") from None


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Flatten an optimizer's state into named tensors plus its JSON-able param groups."""
    state_dict = optimizer.state_dict()
    tensors = {}
    for index, per_param in state_dict["state"].items():
        for key, value in per_param.items():
            tensors[f"optim.{index}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return tensors, state_dict["param_groups"]


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                      param_groups: list[dict]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})
