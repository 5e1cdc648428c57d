"""P-tuning: virtual tokens produced by a prompt encoder (an MLP or LSTM over learned embeddings).

The encoder is deterministic once trained, and PEFT saves its output: ``prompt_embeddings
[num_virtual_tokens, token_dim]`` is the encoder run once over the virtual-token ids (and what
``PeftModel.from_pretrained`` serves in inference mode). So a P-tuning adapter is served exactly
as prompt tuning is; the encoder's fields only describe how it was trained.

Training (``TrainablePTuning``) runs the encoder as PEFT's ``PromptEncoder`` does: an embedding
per virtual token, then either a three-layer MLP (``token -> hidden -> hidden -> token`` with
ReLUs) or a bidirectional LSTM of ``encoder_num_layers`` layers followed by a two-layer MLP.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from adapters.kinds.base import AdapterKind, AdapterLimits, AdapterWeights, check_training_virtual_tokens
from adapters.kinds.prompt import FIELDS as PROMPT_FIELDS
from adapters.kinds.prompt import PromptTuningHandler
from adapters.training.base import PARAM_DTYPE, TrainableAdapter
from adapters.validate import anything, equals, number_in

FIELDS = {
    **PROMPT_FIELDS,
    "encoder_reparameterization_type": equals("MLP", "LSTM"),
    "encoder_hidden_size": anything,
    "encoder_num_layers": anything,
    "encoder_dropout": number_in(0.0, 1.0),
}


class TrainablePTuning(TrainableAdapter):
    """PEFT's prompt encoder; ``encoder_type`` None holds fixed-width embeddings directly (PEFT's
    inference-mode encoder, what a saved adapter loads into)."""

    kind = AdapterKind.P_TUNING

    def __init__(self, count: int, token_dim: int, encoder_type: str | None, hidden: int, num_layers: int,
                 dropout: float, seed: int, device: torch.device):
        super().__init__(seed, device)
        self.encoder_type, self.hidden, self.num_layers, self.dropout_p = encoder_type, hidden, num_layers, dropout
        with torch.random.fork_rng(devices=[]):  # PEFT's init (torch defaults), seeded by the job
            torch.manual_seed(seed)
            self.embedding = nn.Embedding(count, token_dim)
            if encoder_type == "LSTM":
                self.lstm_head = nn.LSTM(input_size=token_dim, hidden_size=hidden, num_layers=num_layers,
                                         dropout=dropout, bidirectional=True, batch_first=True)
                self.mlp_head = nn.Sequential(nn.Linear(hidden * 2, hidden * 2), nn.ReLU(),
                                              nn.Linear(hidden * 2, token_dim))
            elif encoder_type == "MLP":
                self.mlp_head = nn.Sequential(nn.Linear(token_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                                              nn.ReLU(), nn.Linear(hidden, token_dim))
        self.to(device, PARAM_DTYPE)

    def prompt_embeddings(self) -> torch.Tensor:
        if self.encoder_type is None:
            return self.embedding.weight
        embeds = self.embedding.weight.unsqueeze(0)  # the embedding of ids 0 .. n-1, as one batch row
        if self.encoder_type == "LSTM":
            embeds = self.lstm_head(embeds)[0]
        return self.mlp_head(embeds)[0]

    def to_weights(self) -> AdapterWeights:
        was_training = self.training
        self.eval()  # the LSTM's dropout off: PEFT saves the encoder's output in eval mode
        with torch.no_grad():
            prompt = self.prompt_embeddings().detach().cpu().clone()
        self.train(was_training)
        config: dict[str, Any] = {"encoder_reparameterization_type": self.encoder_type or "MLP",
                                  "encoder_hidden_size": self.hidden, "encoder_num_layers": self.num_layers,
                                  "encoder_dropout": self.dropout_p}
        return AdapterWeights(kind=self.kind, config=config, prompt=prompt)


class PTuningHandler(PromptTuningHandler):
    kind = AdapterKind.P_TUNING
    peft_type = "P_TUNING"
    serves_as = AdapterKind.PROMPT_TUNING
    fields = FIELDS
    default_learning_rate = 1e-3  # the encoder is a small network: LoRA-like steps
    training_fields = frozenset({"num_virtual_tokens", "encoder_reparameterization_type", "encoder_hidden_size",
                                 "encoder_num_layers", "encoder_dropout"})

    def check_training_config(self, config) -> None:
        defaults = type(config).model_fields  # a stored job's config holds every field: compare with defaults
        lstm_only = [f for f in ("encoder_dropout", "encoder_num_layers") if getattr(config, f) != defaults[f].default]
        if config.encoder_reparameterization_type != "LSTM" and lstm_only:
            raise ValueError(f"{', '.join(lstm_only)} apply to the LSTM prompt encoder only "
                             "(encoder_reparameterization_type 'LSTM'); the MLP encoder has fixed layers")

    def check_training(self, config, limits: AdapterLimits, total_steps: int | None = None) -> None:
        check_training_virtual_tokens(config.num_virtual_tokens, limits)

    def build_trainable(self, config, runtime, tokenizer, total_steps: int) -> TrainablePTuning:
        token_dim = runtime.base_info.hidden_size
        return TrainablePTuning(config.num_virtual_tokens, token_dim, config.encoder_reparameterization_type,
                                config.encoder_hidden_size or token_dim, config.encoder_num_layers,
                                config.encoder_dropout, config.seed, runtime.device)

    def trainable_from_weights(self, weights: AdapterWeights, device: torch.device, seed: int) -> TrainablePTuning:
        count, token_dim = weights.prompt.shape
        cfg = weights.config
        adapter = TrainablePTuning(count, token_dim, None, int(cfg.get("encoder_hidden_size") or token_dim),
                                   int(cfg.get("encoder_num_layers", 2)), float(cfg.get("encoder_dropout", 0.0)),
                                   seed, device)
        with torch.no_grad():
            adapter.embedding.weight.copy_(weights.prompt)
        return adapter
