"""Adapter kinds, each behind the ``KindHandler`` contract of ``adapters.kinds.base``.

A kind is one module here plus one entry in ``HANDLERS``; ``handler_for`` picks the handler of
a PEFT config (by ``peft_type``, then the handler's ``claims``: DoRA is a LoRA config with
``use_dora``), and refuses by name what PEFT can save but this gateway does not serve.
"""

from typing import Any

from adapters.errors import AdapterValidationError
from adapters.kinds.adalora import AdaLoraHandler
from adapters.kinds.base import AdapterKind, KindHandler
from adapters.kinds.dora import DoraHandler
from adapters.kinds.ia3 import Ia3Handler
from adapters.kinds.lora import LoraHandler
from adapters.kinds.prefix import PrefixTuningHandler
from adapters.kinds.prompt import PromptTuningHandler
from adapters.kinds.ptuning import PTuningHandler
from adapters.kinds.vera import VeraHandler

HANDLERS: dict[AdapterKind, KindHandler] = {
    h.kind: h for h in (LoraHandler(), DoraHandler(), AdaLoraHandler(), VeraHandler(), Ia3Handler(),
                        PromptTuningHandler(), PTuningHandler(), PrefixTuningHandler())
}
# PEFT methods this gateway knows of and does not serve, by PEFT's name for them
UNSUPPORTED = {
    "LOHA": "LoHa", "LOKR": "LoKr", "OFT": "OFT", "BOFT": "BOFT",
    "MULTITASK_PROMPT_TUNING": "multitask prompt tuning", "ADAPTION_PROMPT": "adaption prompt (LLaMA-Adapter)",
    "POLY": "Poly", "LN_TUNING": "LayerNorm tuning", "FOURIERFT": "FourierFT", "HRA": "HRA", "BONE": "Bone",
    "VBLORA": "VB-LoRA", "XLORA": "X-LoRA", "CPT": "CPT", "RANDLORA": "RandLoRA", "SHIRA": "SHiRA",
    "C3A": "C3A", "MISS": "MiSS", "TRAINABLE_TOKENS": "trainable tokens", "ROAD": "RoAd", "WAVEFT": "WaveFT",
    "DELORA": "DeLoRA", "OSF": "OSF", "GRALORA": "GraLoRA", "CARTRIDGE": "Cartridge",
}
SERVED = "LoRA, DoRA, AdaLoRA, VeRA, IA3, prompt tuning, P-tuning, prefix tuning"


def handler_for(config: dict[str, Any]) -> KindHandler:
    """The handler of a parsed ``adapter_config.json``, or an AdapterValidationError naming the method."""
    peft_type = config.get("peft_type")
    if isinstance(peft_type, str):
        for handler in HANDLERS.values():
            if handler.peft_type == peft_type and handler.claims(config):
                return handler
        if peft_type in UNSUPPORTED:
            raise AdapterValidationError(
                f"{UNSUPPORTED[peft_type]} adapters (peft_type {peft_type!r}) are not served by this gateway; "
                f"served: {SERVED}")
    shown = peft_type if isinstance(peft_type, str) and len(peft_type) <= 40 else "?"
    raise AdapterValidationError(f"peft_type {shown!r} is not served; served: {SERVED}")


__all__ = ["AdapterKind", "KindHandler", "HANDLERS", "UNSUPPORTED", "handler_for"]
