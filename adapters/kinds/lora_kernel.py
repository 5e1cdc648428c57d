"""Which path applies LoRA deltas: torch's matmuls per adapter run, or the Triton kernels.

``auto`` measures rather than assumes: on CUDA, with Triton importable, both paths apply the same
synthetic decode-shaped batch (32 single-token rows over adapters of ranks 8 to 64, plus one
128-token prefill run) to a layer of the model's width, their results are compared, and the
faster one serves. A kernel that fails, or disagrees beyond rounding, is never chosen. On CPU
the torch path is the only one (Triton compiles for GPUs).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from adapters.kinds.lora import LoraBank
from adapters.kinds.lora_buckets import MIN_BUCKET_RANK, RankBucket, bucket_rank
from adapters.runtime import TokenLayout, token_segments

log = logging.getLogger(__name__)

KERNELS = ("auto", "torch", "triton")
PROBE_RANKS = (8, 16, 32, 64)
PROBE_DECODE_ROWS = 32
PROBE_PREFILL_TOKENS = 128


@dataclass
class KernelChoice:
    kernel: str  # "torch" or "triton"
    reason: str
    timings_ms: dict[str, float] = field(default_factory=dict)  # path -> time of the probe batch


def triton_available() -> str | None:
    """None when Triton can be imported, else why not."""
    try:
        import triton  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means: no kernel
        return f"Triton is not importable ({exc})"
    return None


def kernel_unavailable(device: torch.device) -> str | None:
    """None when the Triton kernels can run on ``device``, else why not."""
    return "the Triton LoRA kernel runs on CUDA only" if device.type != "cuda" else triton_available()


def check_lora_kernel(setting: str, device: torch.device) -> None:
    """Refuse (ValueError) a ``lora_kernel`` setting that cannot run on ``device``: before the model loads."""
    if setting not in KERNELS:
        raise ValueError(f"lora_kernel must be one of {', '.join(KERNELS)}, not {setting!r}")
    missing = kernel_unavailable(device) if setting == "triton" else None
    if missing:
        raise ValueError(f"lora_kernel=triton: {missing}")


def choose_lora_kernel(setting: str, device: torch.device, dtype: torch.dtype, hidden_size: int) -> KernelChoice:
    """The LoRA path for ``setting`` (``KERNELS``); ``triton`` where it cannot run raises ValueError."""
    check_lora_kernel(setting, device)
    if setting == "torch":
        return KernelChoice("torch", "set to torch")
    missing = kernel_unavailable(device)
    if missing:
        return KernelChoice("torch", missing)
    if setting == "triton":
        return KernelChoice("triton", "set to triton")
    return measure(device, dtype, hidden_size)


def probe_batch(device: torch.device, dtype: torch.dtype, hidden_size: int, seed: int = 0):
    """Both banks (torch path, fused path) holding the same adapters, and a packed batch for them:
    ``(torch_bank, fused_bank, x [N, hidden], y [N, hidden], segments)``."""
    generator = torch.Generator().manual_seed(seed)
    slots = len(PROBE_RANKS) * 2 + 1
    plain, fused = LoraBank(dtype, device), LoraBank(dtype, device, fused=True, slots=slots)
    for slot in range(1, slots):
        rank = PROBE_RANKS[(slot - 1) % len(PROBE_RANKS)]
        a = torch.randn(rank, hidden_size, generator=generator) / hidden_size ** 0.5
        b = torch.randn(hidden_size, rank, generator=generator) / rank ** 0.5
        channel = torch.rand(hidden_size, generator=generator) + 0.5 if slot == 1 else None  # one DoRA slot
        for bank in (plain, fused):
            bank.write(slot, a, b, channel)
    row_slots = [1] * PROBE_PREFILL_TOKENS + [1 + i % (slots - 1) for i in range(PROBE_DECODE_ROWS)]
    tokens = len(row_slots)
    x = torch.randn(tokens, hidden_size, generator=generator).to(device=device, dtype=dtype)
    y = torch.randn(tokens, hidden_size, generator=generator).to(device=device, dtype=dtype)
    return plain, fused, x, y, token_segments(row_slots)


def measure(device: torch.device, dtype: torch.dtype, hidden_size: int, repeats: int = 20) -> KernelChoice:
    """Both paths on ``probe_batch``: the faster, unless the kernel fails or disagrees."""
    plain, fused, x, y, segments = probe_batch(device, dtype, hidden_size)
    layout = TokenLayout(torch.empty(0, dtype=torch.long, device=device), segments)
    outputs: dict[str, torch.Tensor] = {}
    timings: dict[str, float] = {}
    for name, bank in (("torch", plain), ("triton", fused)):
        try:
            outputs[name] = bank.transform_output(y.clone(), x, layout)  # also compiles the kernels
            work = y.clone()
            _sync(device)
            start = time.perf_counter()
            for _ in range(repeats):
                bank.transform_output(work, x, layout)
            _sync(device)
            timings[name] = (time.perf_counter() - start) / repeats * 1e3
        except Exception as exc:  # noqa: BLE001 - a kernel that cannot run is not chosen
            log.warning("LoRA kernel probe: the %s path failed (%s)", name, exc)
            return KernelChoice("torch", f"the {name} path failed in the probe: {exc}", timings)
    error = ((outputs["triton"].float() - outputs["torch"].float()).abs().max()
             / outputs["torch"].float().abs().max().clamp(min=1e-6)).item()
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    if not error <= tolerance:
        return KernelChoice("torch", f"the triton kernel disagrees with torch (relative error {error:.2e})", timings)
    kernel = "triton" if timings["triton"] < timings["torch"] else "torch"
    return KernelChoice(kernel, f"measured faster (relative error {error:.1e})", timings)


def warm_up(device: torch.device, dtype: torch.dtype, hidden_size: int, max_rank: int) -> int:
    """Compile the kernels for every rank bucket up to ``max_rank``'s, with and without DoRA's
    rescale, at a layer of the model's width: Triton compiles a variant on its first launch, and
    serving would otherwise stall every stream of the batch that first meets one. Returns the
    number of variants run (compiled ones are cached on disk by Triton for later starts)."""
    from adapters.kinds.lora_triton import add_bucket, segment_tiles

    x = torch.zeros(1, hidden_size, dtype=dtype, device=device)
    y = torch.zeros(1, hidden_size, dtype=dtype, device=device)
    tiles = segment_tiles(((0, 1, 1),), device)
    rank, variants = MIN_BUCKET_RANK, 0
    while rank <= bucket_rank(max_rank):
        for rescaled in (False, True):
            bucket = RankBucket(rank, hidden_size, hidden_size, 2, dtype, device)
            channel = torch.ones(hidden_size, dtype=dtype, device=device) if rescaled else None
            bucket.add(1, torch.zeros(hidden_size, rank, dtype=dtype, device=device),
                       torch.zeros(rank, hidden_size, dtype=dtype, device=device), channel, None)
            add_bucket(y, x, tiles, bucket)
            variants += 1
        rank *= 2
    _sync(device)
    return variants


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
