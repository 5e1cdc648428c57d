"""P-tuning: virtual tokens produced by a prompt encoder (an MLP or LSTM over learned embeddings).

The encoder is deterministic once trained, and PEFT saves its output: ``prompt_embeddings
[num_virtual_tokens, token_dim]`` is the encoder run once over the virtual-token ids (and what
``PeftModel.from_pretrained`` serves in inference mode). So a P-tuning adapter is served exactly
as prompt tuning is; the encoder's fields only describe how it was trained.
"""

from __future__ import annotations

from adapters.kinds.base import AdapterKind
from adapters.kinds.prompt import FIELDS as PROMPT_FIELDS
from adapters.kinds.prompt import PromptTuningHandler
from adapters.validate import anything, equals, number_in

FIELDS = {
    **PROMPT_FIELDS,
    "encoder_reparameterization_type": equals("MLP", "LSTM"),
    "encoder_hidden_size": anything,
    "encoder_num_layers": anything,
    "encoder_dropout": number_in(0.0, 1.0),
}


class PTuningHandler(PromptTuningHandler):
    kind = AdapterKind.P_TUNING
    peft_type = "P_TUNING"
    serves_as = AdapterKind.PROMPT_TUNING
    fields = FIELDS
