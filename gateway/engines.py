"""Build the engine the settings ask for: paged (default) or the padded baseline."""

from __future__ import annotations

import logging

import torch

from adapters.runtime import AdapterRuntime
from gateway.engine import Engine
from gateway.kv_blocks import BlockManager
from gateway.model_runner import ModelRunner
from gateway.padded_engine import PaddedEngine
from gateway.paged_attention import KVPool
from gateway.paged_engine import PagedEngine
from gateway.paged_runner import PagedRunner
from gateway.settings import Settings

log = logging.getLogger(__name__)


def kv_shape(config) -> dict[str, int]:
    """The KV pool's shape from the model's config: layers, KV heads, head width."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return dict(layers=config.num_hidden_layers, kv_heads=config.num_key_value_heads, head_dim=head_dim)


def kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    """Bytes one token's keys and values take in every layer."""
    shape = kv_shape(config)
    return 2 * shape["layers"] * shape["kv_heads"] * shape["head_dim"] * torch.finfo(dtype).bits // 8


def check_kv_pool(settings: Settings, config, dtype: torch.dtype, context_window: int) -> None:
    """Refuse (``ValueError``) a paged KV pool set in tokens or bytes that cannot hold one context
    window: said before the model loads, with the size that would."""
    if settings.kv_cache != "paged" or (settings.kv_cache_tokens is None and settings.kv_cache_bytes is None):
        return
    per_token = kv_bytes_per_token(config, dtype)
    block = settings.kv_block_size
    set_in_settings = torch.device("cpu")  # the size comes from the settings, not from device memory
    capacity = -(-kv_pool_tokens(settings, set_in_settings, per_token, context_window) // block) * block
    if capacity < context_window:
        given = (f"kv_cache_tokens={settings.kv_cache_tokens}" if settings.kv_cache_tokens is not None
                 else f"kv_cache_bytes={settings.kv_cache_bytes.human_readable()}")
        raise ValueError(f"{given}: the KV pool would hold {capacity} tokens of this model "
                         f"({per_token} bytes each), less than one context window ({context_window} tokens); "
                         f"give it at least {context_window} tokens ({context_window * per_token / 2**20:.0f} MiB)")


def check_paged_attention(settings: Settings, config, context_window: int) -> None:
    """Refuse (``ValueError``) a model whose attention does what the paged cache's attention
    (``gateway.paged_attention``) does not: a sliding window narrower than the context window
    (Mistral 7B v0.1, Gemma 2, Qwen2 with ``use_sliding_window``) or capped attention logits
    (Gemma 2). Served anyway, its answers would silently differ from the model's."""
    if settings.kv_cache != "paged":
        return
    softcap = getattr(config, "attn_logit_softcapping", None)
    if softcap is not None:
        problem = f"this model caps its attention logits (attn_logit_softcapping={softcap})"
    else:
        window = getattr(config, "sliding_window", None)
        layer_types = getattr(config, "layer_types", None)
        if layer_types is not None:  # transformers names each layer's attention
            slides = "sliding_attention" in layer_types
        else:
            slides = getattr(config, "use_sliding_window", True) is not False
        if window is None or not slides or window >= context_window:  # a window as wide never binds
            return
        problem = (f"this model attends within a sliding window of {window} tokens, narrower than its "
                   f"context window ({context_window})")
    raise ValueError(f"{problem}, which the paged KV cache's attention does not apply: its answers would "
                     "differ from the model's. Serve it with kv_cache=padded (GATEWAY_KV_CACHE=padded), "
                     "which runs the model's own attention")


def kv_pool_tokens(settings: Settings, device: torch.device, bytes_per_token: int, context_window: int) -> int:
    """The KV pool's capacity in tokens: as set (in tokens or bytes), else a share of free CUDA memory,
    else (CPU) four context windows."""
    if settings.kv_cache_tokens is not None:
        return settings.kv_cache_tokens
    if settings.kv_cache_bytes is not None:
        return max(1, settings.kv_cache_bytes // bytes_per_token)  # under one token: refused as too small
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * settings.kv_cache_memory_fraction) // bytes_per_token
    return 4 * context_window


def build_engine(settings: Settings, runtime: AdapterRuntime, tokenizer, *, context_window: int,
                 eos_token_ids: set[int]) -> Engine:
    options = dict(context_window=context_window, max_batch_size=settings.max_batch_size,
                   max_prefill_tokens=settings.max_prefill_tokens, max_queued_requests=settings.max_queued_requests,
                   eos_token_ids=eos_token_ids, max_queued_tokens=settings.max_queued_tokens,
                   max_queue_wait_seconds=settings.max_queue_wait_seconds)
    model = runtime.model
    check_paged_attention(settings, model.config, context_window)
    if settings.kv_cache == "padded":
        return PaddedEngine(ModelRunner(model, runtime), tokenizer, **options)
    shape = kv_shape(model.config)
    bytes_per_token = kv_bytes_per_token(model.config, runtime.dtype)
    block = settings.kv_block_size
    num_blocks = -(-kv_pool_tokens(settings, runtime.device, bytes_per_token, context_window) // block)
    pool = KVPool(num_blocks=num_blocks, block_size=block, dtype=runtime.dtype, device=runtime.device, **shape)
    log.info("paged KV cache: %d blocks of %d tokens (%.0f MiB)", num_blocks, block,
             num_blocks * block * bytes_per_token / 2**20)
    # one request may need half the pool at its longest, and always one whole context window:
    # the other half stays for everyone else (per-key limits bound how many requests one client sends)
    max_request_blocks = max(num_blocks // 2, -(-context_window // block))
    return PagedEngine(PagedRunner(model, runtime, pool), tokenizer,
                       blocks=BlockManager(num_blocks, block, settings.prefix_caching),
                       max_step_tokens=settings.max_step_tokens,
                       max_decode_slowdown=settings.max_decode_slowdown, max_request_blocks=max_request_blocks, **options)
