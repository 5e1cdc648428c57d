"""Read and write adapters in PEFT's folder format (adapter_config.json + adapter_model.safetensors)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from adapters.archive import PICKLE_SUFFIXES
from adapters.errors import AdapterValidationError
from adapters.kinds import HANDLERS, handler_for
from adapters.kinds.base import AdapterLimits, AdapterWeights, BaseModelInfo
from adapters.safetensors_check import load_checked_tensors
from adapters.validate import load_config

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


def read_adapter(folder: Path, base: BaseModelInfo, limits: AdapterLimits, dtype: torch.dtype) -> AdapterWeights:
    """Parse and validate a PEFT adapter folder against the base model. Never unpickles."""
    if not (folder / WEIGHTS_FILE).is_file():
        pickles = [p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES] if folder.is_dir() else []
        if pickles:
            raise AdapterValidationError(
                f"{pickles[0]} is a pickle file, which is never loaded (it can run code); "
                f"provide {WEIGHTS_FILE} instead")
        raise AdapterValidationError(f"{WEIGHTS_FILE} is missing")
    if not (folder / CONFIG_FILE).is_file():
        raise AdapterValidationError(f"{CONFIG_FILE} is missing")
    config = load_config(folder / CONFIG_FILE)
    handler = handler_for(config)  # before the tensors: an unserved method is refused by name, cheaply
    tensors = load_checked_tensors(folder / WEIGHTS_FILE, limits.max_adapter_bytes)
    return handler.from_peft(config, tensors, base, limits, dtype)


def write_adapter(weights: AdapterWeights, folder: Path) -> None:
    """Write ``weights`` as a PEFT folder that ``PeftModel.from_pretrained`` loads."""
    config, tensors = HANDLERS[weights.kind].to_peft(weights)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(folder / WEIGHTS_FILE),
              metadata={"format": "pt"})
    tmp = folder / (CONFIG_FILE + ".tmp")
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True))
    os.replace(tmp, folder / CONFIG_FILE)
