"""Builders shared by the tests: a tiny ChatML tokenizer, tiny random Llama models, and PEFT
adapters of every kind built on them (imported as ``support``; ``pythonpath`` in pyproject)."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
REPO = Path(__file__).resolve().parent.parent


def build_tokenizer(chat_template: str | None = CHATML) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained in memory (no files, no hub)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["hello world, how are you?", "the quick brown fox jumps over the lazy dog",
                             "user assistant system", "What is two plus two? Four."], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    fast.chat_template = chat_template
    return fast


def build_tiny_llama(vocab_size: int = 320, seed: int = 0, *, hidden: int = 32, intermediate: int = 64,
                     layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, eos_token_id=2, bos_token_id=None, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


def build_small_llama(vocab_size: int = 320, seed: int = 0) -> LlamaForCausalLM:
    """Wider than the tiny one: its adapters weigh megabytes (uploads take time; leaks show)."""
    return build_tiny_llama(vocab_size, seed, hidden=256, intermediate=512, layers=4)


def peft_config(kind: str, **overrides):
    from peft import (
        AdaLoraConfig, IA3Config, LoraConfig, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, VeraConfig,
    )

    if kind == "lora":
        return LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": "all-linear", **overrides})
    if kind == "dora":
        return LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": "all-linear", "use_dora": True, **overrides})
    if kind == "adalora":
        return AdaLoraConfig(**{"init_r": 6, "target_r": 4, "total_step": 10, "lora_alpha": 8,
                                "target_modules": ["q_proj", "v_proj", "down_proj"], **overrides})
    if kind == "vera":
        return VeraConfig(**{"r": 8, "target_modules": ["q_proj", "v_proj", "up_proj", "down_proj"], **overrides})
    if kind == "prefix_tuning":
        return PrefixTuningConfig(**{"task_type": "CAUSAL_LM", "num_virtual_tokens": 4, **overrides})
    if kind == "p_tuning":
        return PromptEncoderConfig(**{"task_type": "CAUSAL_LM", "num_virtual_tokens": 5, "encoder_hidden_size": 16,
                                      **overrides})
    if kind == "ia3":
        return IA3Config(**{"task_type": "CAUSAL_LM", **overrides})
    if kind == "prompt_tuning":
        return PromptTuningConfig(**{"task_type": "CAUSAL_LM", "num_virtual_tokens": 5, **overrides})
    raise ValueError(kind)


def make_peft_adapter(base: torch.nn.Module, kind: str, folder: Path, seed: int = 1, scale: float = 0.3,
                      **overrides):
    """Save a PEFT adapter with random non-trivial weights on a copy of ``base``; return the
    PeftModel (the reference) in eval mode. Every trainable parameter is perturbed: DoRA's
    magnitudes, AdaLoRA's singular values (zero at init), VeRA's scaling vectors, P-tuning's
    prompt encoder (PEFT saves its output)."""
    from peft import get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(base), peft_config(kind, **overrides))
    with torch.no_grad():
        for _, param in model.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * scale)
    model.save_pretrained(folder)
    return model.eval()
