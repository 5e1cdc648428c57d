"""Adapter kinds, each behind the ``KindHandler`` contract of ``adapters.kinds.base``."""

from adapters.kinds.base import AdapterKind, KindHandler
from adapters.kinds.ia3 import Ia3Handler
from adapters.kinds.lora import LoraHandler
from adapters.kinds.prompt import PromptTuningHandler

HANDLERS: dict[AdapterKind, KindHandler] = {
    h.kind: h for h in (LoraHandler(), Ia3Handler(), PromptTuningHandler())
}
BY_PEFT_TYPE: dict[str, KindHandler] = {h.peft_type: h for h in HANDLERS.values()}

__all__ = ["AdapterKind", "KindHandler", "HANDLERS", "BY_PEFT_TYPE"]
