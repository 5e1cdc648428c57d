"""PEFT's own ways of serving many LoRA adapters, on the same NF4 base and the same adapter files:
one request at a time with ``set_adapter``, and one mixed batch with ``adapter_names=`` (PEFT's
mixed-batch inference, LoRA only). Greedy, exactly ``max_tokens`` new tokens per request."""

from __future__ import annotations

import time
from pathlib import Path

import torch


class PeftLoraServer:
    def __init__(self, base_model: torch.nn.Module, folders: list[Path], pad_token_id: int):
        from peft import PeftModel

        self.names = [f"a{i}" for i in range(len(folders))]
        self.model = PeftModel.from_pretrained(base_model, str(folders[0]), adapter_name=self.names[0])
        for name, folder in zip(self.names[1:], folders[1:], strict=True):
            self.model.load_adapter(str(folder), adapter_name=name)
        self.model.eval()
        self.pad_token_id = pad_token_id

    def _generate(self, input_ids: torch.Tensor, max_tokens: int, **extra) -> int:
        with torch.inference_mode():
            out = self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                      max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                                      pad_token_id=self.pad_token_id, **extra)
        new = out.shape[1] - input_ids.shape[1]
        if new != max_tokens:
            raise RuntimeError(f"PEFT generated {new} tokens instead of {max_tokens}")
        return new * input_ids.shape[0]

    def serial(self, prompts: list[list[int]], max_tokens: int) -> dict:
        """One request after another, switching adapters with ``set_adapter`` (round robin)."""
        started = time.monotonic()
        tokens = 0
        for i, prompt in enumerate(prompts):
            self.model.set_adapter(self.names[i % len(self.names)])
            tokens += self._generate(torch.tensor([prompt]), max_tokens)
        wall = time.monotonic() - started
        return {"requests": len(prompts), "tokens": tokens, "wall_s": round(wall, 3),
                "tokens_per_s": round(tokens / wall, 2)}

    def mixed_batch(self, prompts: list[list[int]], max_tokens: int) -> dict:
        """All prompts in one ``generate`` call, row i on adapter ``i % adapters`` (same-length
        prompts: no padding)."""
        if len({len(p) for p in prompts}) != 1:
            raise ValueError("mixed_batch takes prompts of one length")
        names = [self.names[i % len(self.names)] for i in range(len(prompts))]
        started = time.monotonic()
        tokens = self._generate(torch.tensor(prompts), max_tokens, adapter_names=names)
        wall = time.monotonic() - started
        return {"requests": len(prompts), "adapters": len(set(names)), "tokens": tokens, "wall_s": round(wall, 3),
                "tokens_per_s": round(tokens / wall, 2)}
