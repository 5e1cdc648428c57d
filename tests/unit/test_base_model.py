"""Loading a base model from a local folder: NF4 through bitsandbytes on CPU, plain weights, and
the dummy-weights option; the settings checks that guard the start."""

import pytest
import torch
from support import build_tiny_llama, build_tokenizer
from pydantic import ValidationError

from gateway.base_model import ModelLoadError, load_base
from gateway.settings import Settings


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-model")
    tokenizer = build_tokenizer()
    # 64 wide at least: bitsandbytes' packed CPU kernel (on CPUs that have it) quantizes in blocks
    # of 64 input features and fails on narrower layers
    model = build_tiny_llama(vocab_size=len(tokenizer), hidden=64, intermediate=128)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_nf4_load_quantizes_linear_layers(tiny_folder, tmp_path):
    import bitsandbytes as bnb

    base = load_base(Settings(model=str(tiny_folder), data_dir=tmp_path, device="cpu"))
    q_proj = base.model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, bnb.nn.Linear4bit)
    assert q_proj.weight.quant_state.quant_type == "nf4"
    assert base.dtype == torch.float32 and base.name == tiny_folder.name
    assert base.context_window == 256
    logits = base.model(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all()


def test_plain_load_and_served_name(tiny_folder, tmp_path):
    base = load_base(Settings(model=str(tiny_folder), data_dir=tmp_path, quantization="none",
                              served_model_name="tiny-base"))
    assert isinstance(base.model.model.layers[0].self_attn.q_proj, torch.nn.Linear)
    assert base.name == "tiny-base"


def test_dummy_weights_keep_shapes_and_are_cached(tiny_folder, tmp_path):
    settings = Settings(model=str(tiny_folder), data_dir=tmp_path, quantization="none", dummy_weights=True)
    first = load_base(settings)
    cached = list((tmp_path / "models").iterdir())
    assert len(cached) == 1 and cached[0].name.startswith("dummy-")
    second = load_base(settings)
    assert first.model.config.hidden_size == second.model.config.hidden_size == 64
    w1 = first.model.model.layers[0].mlp.up_proj.weight
    w2 = second.model.model.layers[0].mlp.up_proj.weight
    assert torch.equal(w1, w2)


def test_missing_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="cannot load base model"):
        load_base(Settings(model=str(tmp_path / "nope"), data_dir=tmp_path, quantization="none"))


def test_serve_refuses_a_missing_model_folder_before_loading(monkeypatch, tmp_path):
    import gateway.app
    from gateway.cli import main

    monkeypatch.setattr(gateway.app, "create_app", lambda *a: pytest.fail("must refuse before building the app"))
    with pytest.raises(SystemExit, match="refusing to start: cannot load base model '.*nope': no such folder"):
        main(["serve", "--model", str(tmp_path / "nope"), "--data-dir", str(tmp_path / "data"), "--device", "cpu"])


@pytest.mark.parametrize("env", [
    {"GATEWAY_PORT": "70000"},
    {"GATEWAY_MAX_BATCH_SIZE": "0"},
    {"GATEWAY_DEVICE": "tpu"},
    {"GATEWAY_ADAPTERS_DIR": "/does/not/exist"},
    {"GATEWAY_DEFAULT_MAX_TOKENS": "100", "GATEWAY_MAX_TOKENS_LIMIT": "10"},
])
def test_invalid_settings_are_refused(monkeypatch, env):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValidationError):
        Settings()


def test_api_keys_from_comma_separated_env(monkeypatch):
    monkeypatch.setenv("GATEWAY_API_KEYS", "one, two,,")
    assert [(k.key, k.name) for k in Settings().api_keys] == [("one", "key-1"), ("two", "key-2")]


def test_cli_reports_invalid_settings(capsys):
    from gateway.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--port", "not-a-port"])
    assert "invalid settings" in str(exit_info.value) and "port" in str(exit_info.value)
