"""Session fixtures: the tiny tokenizer, and the real SmolLM2 model materialized once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from support import REPO, build_tokenizer
from transformers import PreTrainedTokenizerFast


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer()


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The embedded default model as a safetensors folder, materialized once per machine."""
    from gateway.base_model import materialize_embedded

    data_dir = Path(os.environ.get("GATEWAY_TEST_DATA_DIR", REPO / ".test-data"))
    return materialize_embedded(data_dir)
