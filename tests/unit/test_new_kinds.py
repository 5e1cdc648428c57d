"""DoRA, AdaLoRA, VeRA and P-tuning from PEFT's own files: parsed, described, written back as PEFT
loads them, refused by name when malformed or unserved, AdaLoRA's pruned rank pattern served as
PEFT loads it, and DoRA on an NF4 base equal to PEFT on the same NF4 base. (Each kind alone and
in mixed packed batches against PeftModel: test_runtime_equivalence / test_paged_engine.)"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from pydantic import ValidationError
from support import build_tiny_llama, build_tokenizer, make_peft_adapter, peft_config
from test_adapter_validation import mutated, read, refused, set_key
from test_runtime_equivalence import greedy, load, make_runtime, prompt_ids, ref_greedy, ref_logits, rel_err

from adapters.kinds.base import AdapterLimits
from adapters.peft_io import CONFIG_FILE, write_adapter
from adapters.runtime import AdapterRuntime
from adapters.training.config import TrainingConfig
from gateway.model_runner import ModelRunner

TOL = 1e-4
NEW_KINDS = {
    "dora": ("dora", {}),
    "adalora": ("adalora", {}),
    "vera": ("vera", {}),
    "vera_regenerated": ("vera", {"save_projection": False, "projection_prng_key": 77, "r": 4}),
    "p_tuning": ("p_tuning", {"num_virtual_tokens": 6}),
    "prefix": ("prefix_tuning", {"num_virtual_tokens": 5, "prefix_projection": True, "encoder_hidden_size": 16}),
}
Q = "model.layers.0.self_attn.q_proj"


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.fixture(scope="module")
def base():
    return build_tiny_llama()


@pytest.fixture(scope="module")
def base_info(base):
    return AdapterRuntime(copy.deepcopy(base), max_slots=1, dtype=torch.float32).base_info


@pytest.fixture(scope="module")
def good(base, tmp_path_factory):
    root = tmp_path_factory.mktemp("new-kinds")
    return {name: (root / name, make_peft_adapter(base, kind, root / name, seed=4, **overrides))
            for name, (kind, overrides) in NEW_KINDS.items()}


# ---- happy paths -------------------------------------------------------------------------------

def test_describe_new_kinds(good, base_info):
    assert read(good["dora"][0], base_info).describe() == {"kind": "dora", "rank": 4, "target_modules": [
        "down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]}
    assert read(good["adalora"][0], base_info).describe() == {
        "kind": "adalora", "rank": 6, "init_r": 6, "target_modules": ["down_proj", "q_proj", "v_proj"]}
    vera = read(good["vera"][0], base_info)
    assert vera.describe() == {"kind": "vera", "rank": 8,
                               "target_modules": ["down_proj", "q_proj", "up_proj", "v_proj"]}
    assert vera.shared["vera_A"].shape == (8, 64) and vera.shared["vera_B"].shape == (64, 8)  # largest layer
    p = read(good["p_tuning"][0], base_info)
    assert p.describe() == {"kind": "p_tuning", "num_virtual_tokens": 6, "target_modules": []}
    assert p.virtual_tokens == 6
    prefix = read(good["prefix"][0], base_info)
    assert prefix.describe() == {"kind": "prefix_tuning", "num_virtual_tokens": 5, "target_modules": []}
    assert prefix.virtual_tokens == 5 and prefix.prefix.shape == (4, 5, 2, 8)  # 2 layers x (k, v), GQA heads


@pytest.mark.parametrize("name", list(NEW_KINDS))
def test_write_adapter_round_trip_through_peft(good, base, base_info, tmp_path, name):
    from peft import PeftModel

    folder, reference = good[name]
    weights = read(folder, base_info)
    out = tmp_path / "written"
    write_adapter(weights, out)
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), out).eval()
    ids = prompt_ids(7, seed=1)
    assert rel_err(ref_logits(reloaded, ids), ref_logits(reference, ids)) <= 1e-5
    again = read(out, base_info)
    assert again.describe() == weights.describe()
    for x, y in zip(again.tensors(), weights.tensors(), strict=True):
        torch.testing.assert_close(x, y)


def test_adalora_rank_pattern_served_as_peft_loads_it(base, tmp_path):
    """A pruned AdaLoRA (rank_pattern set as PEFT's allocator sets it at its last step; one module
    pruned to rank 0) is saved at the kept ranks; served equal to PeftModel.from_pretrained."""
    from peft import PeftModel, get_peft_model

    torch.manual_seed(6)
    model = get_peft_model(copy.deepcopy(base), peft_config("adalora"))
    with torch.no_grad():
        for _, param in model.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.3)
    model.peft_config["default"].rank_pattern = {
        "model.layers.0.self_attn.q_proj.lora_E.default": [True, False, True, True, False, False],
        "model.layers.1.mlp.down_proj.lora_E.default": [False] * 6,
        "model.layers.1.self_attn.v_proj.lora_E.default": [True] * 6,
    }
    model.save_pretrained(tmp_path / "pruned")
    config = json.loads((tmp_path / "pruned" / CONFIG_FILE).read_text())
    assert config["rank_pattern"][f"{Q}.lora_E"] == [True, False, True, True, False, False]
    reference = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "pruned").eval()

    runtime, runner = make_runtime(base)
    weights = load(runtime, tmp_path / "pruned")
    assert weights.modules[Q].a.shape == (3, 32)
    assert weights.modules["model.layers.1.mlp.down_proj"].a.shape == (0, 64)
    slot = runtime.install(weights)
    ids = prompt_ids(9, seed=8)
    logits, tokens = greedy(runner, [ids, ids], [slot, 0])
    assert rel_err(logits[0], ref_logits(reference, ids)) <= TOL
    assert tokens[0] == ref_greedy(reference, ids)
    assert rel_err(logits[1], ref_logits(base, ids)) <= TOL
    runtime.uninstall(slot)
    assert rel_err(runner.prefill([ids], [slot])[0][0], ref_logits(base, ids)) <= TOL


def test_dora_on_an_nf4_base_matches_peft_on_the_same_base(tmp_path):
    """The magnitude scale is computed from the dequantized NF4 weight, as PEFT does."""
    import bitsandbytes as bnb
    from peft import get_peft_model

    from gateway.base_model import load_base
    from gateway.settings import Settings

    tokenizer = build_tokenizer()
    # 64 wide at least: bitsandbytes' packed CPU path quantizes in blocks of 64 input features
    build_tiny_llama(vocab_size=len(tokenizer), hidden=64, intermediate=128).save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    settings = Settings(model=str(tmp_path / "m"), data_dir=tmp_path / "data", device="cpu")

    def nf4_model():  # load_base keeps NF4 layers on the exact path (see keep_nf4_exact_on_cpu)
        return load_base(settings).model

    reference = get_peft_model(nf4_model(), peft_config("dora", target_modules=["q_proj", "v_proj", "down_proj"]))
    assert isinstance(reference.base_model.model.model.layers[0].self_attn.q_proj.base_layer, bnb.nn.Linear4bit)
    torch.manual_seed(9)
    with torch.no_grad():
        for _, param in reference.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.3)
    reference.save_pretrained(tmp_path / "dora")
    reference.eval()

    model = nf4_model()
    runtime = AdapterRuntime(model, max_slots=2, dtype=torch.float32)
    runner = ModelRunner(model, runtime)
    slot = runtime.install(load(runtime, tmp_path / "dora"))
    ids = prompt_ids(9, seed=9, vocab=len(tokenizer))
    logits, tokens = greedy(runner, [ids, ids], [slot, 0])
    assert rel_err(logits[0], ref_logits(reference, ids)) <= TOL
    assert tokens[0] == ref_greedy(reference, ids)
    assert rel_err(logits[0], logits[1]) > 1e-3  # the adapter changes the output


# ---- refusals ----------------------------------------------------------------------------------

@pytest.mark.parametrize("peft_type,name", [
    ("LOHA", "LoHa"), ("LOKR", "LoKr"), ("OFT", "OFT"), ("BOFT", "BOFT"),
    ("ADAPTION_PROMPT", "adaption prompt"), ("NOT_A_METHOD", "NOT_A_METHOD"),
])
def test_unserved_methods_are_refused_by_name(good, base_info, tmp_path, peft_type, name):
    folder = mutated(good["dora"][0], tmp_path / peft_type, config_fn=set_key("peft_type", peft_type))
    refused(folder, base_info, name, "not served", "DoRA, AdaLoRA, VeRA")


@pytest.mark.parametrize("name", ["dora", "adalora", "vera", "p_tuning", "prefix"])
def test_modules_to_save_is_refused_by_name_for_every_new_kind(good, base_info, tmp_path, name):
    folder = mutated(good[name][0], tmp_path / name, config_fn=set_key("modules_to_save", ["lm_head"]))
    refused(folder, base_info, "modules_to_save")


def _edit(key: str, fn):
    def apply(tensors):
        name = next(k for k in tensors if k.endswith(key))
        tensors[name] = fn(tensors[name])
    return apply


@pytest.mark.parametrize("name,config_fn,tensors_fn,words", [
    ("dora", None, _edit(f"{Q}.lora_magnitude_vector", lambda t: t * float("nan")), ("lora_magnitude_vector", "NaN")),
    ("dora", None, _edit(f"{Q}.lora_magnitude_vector", lambda t: t[:-1]), ("lora_magnitude_vector", "(32,)")),
    ("dora", None, lambda t: t.pop(f"base_model.model.{Q}.lora_magnitude_vector"), ("lora_magnitude_vector", "DoRA")),
    ("dora", set_key("use_dora", "yes"), None, ("use_dora",)),
    ("adalora", set_key("alpha_pattern", {"q_proj": 4}), None, ("alpha_pattern",)),
    ("adalora", set_key("init_r", 5), None, ("rank 5", "lora_A (6, ")),
    ("adalora", set_key("rank_pattern", {f"{Q}.lora_E": [True] * 4}), None, ("rank_pattern", "init_r = 6")),
    ("adalora", set_key("rank_pattern", {f"{Q}.lora_E": [True, False, True, False, True, False]}), None,
     ("rank 3", Q)),
    ("adalora", set_key("rank_pattern", {"model.layers.0.mlp.up_proj.lora_E": [True] * 6}), None,
     ("rank_pattern", "up_proj")),
    ("adalora", set_key("rank_pattern", {"q_proj": 3}), None, ("rank_pattern",)),
    ("adalora", None, _edit(f"{Q}.lora_E", lambda t: t * float("inf")), ("lora_E", "infinite")),
    ("adalora", None, lambda t: t.pop(f"base_model.model.{Q}.lora_E"), (Q, "lora_E")),
    ("vera", None, lambda t: t.pop("base_model.vera_B"), ("save_projection", "vera_B")),
    ("vera", None, _edit("base_model.vera_A", lambda t: t[:, :32].contiguous()), ("vera_A", "(8, 64)")),
    ("vera", set_key("save_projection", False), None, ("save_projection",)),
    ("vera", None, _edit(f"{Q}.vera_lambda_b", lambda t: t[:-1]), ("vera_lambda_b", "(32,)")),
    ("vera", set_key("target_modules", ["q_proj", "v_proj", "up_proj"]), None, ("down_proj", "does not target")),
    ("vera", set_key("layers_to_transform", [0]), None, ("layers_to_transform",)),
    ("vera_regenerated", set_key("projection_prng_key", -1), None, ("projection_prng_key",)),
    ("p_tuning", set_key("encoder_reparameterization_type", "GRU"), None, ("encoder_reparameterization_type",)),
    ("p_tuning", set_key("num_virtual_tokens", 7), None, ("prompt_embeddings", "(7, 32)")),
    ("p_tuning", None, lambda t: t.update(extra=torch.zeros(2)), ("exactly one tensor",)),
    ("prefix", set_key("num_layers", 3), None, ("num_layers", "2 layers")),
    ("prefix", set_key("num_attention_heads", 4), None, ("num_attention_heads", "2 key/value heads")),
    ("prefix", set_key("num_virtual_tokens", 6), None, ("prompt_embeddings", "(6, 64)")),
    ("prefix", None, _edit("prompt_embeddings", lambda t: t * float("inf")), ("prompt_embeddings", "infinite")),
    ("prefix", set_key("num_transformer_submodules", 2), None, ("num_transformer_submodules",)),
])
def test_malformed_new_kind_adapters_are_refused(good, base_info, tmp_path, name, config_fn, tensors_fn, words):
    folder = mutated(good[name][0], tmp_path / "bad", config_fn=config_fn, tensors_fn=tensors_fn)
    refused(folder, base_info, *words)


def test_new_kinds_respect_the_rank_and_virtual_token_limits(good, base_info):
    refused(good["dora"][0], base_info, "rank 4", limits=AdapterLimits(max_lora_rank=2))
    refused(good["adalora"][0], base_info, "init_r 6", limits=AdapterLimits(max_lora_rank=4))
    refused(good["vera"][0], base_info, "rank 8", limits=AdapterLimits(max_lora_rank=4))
    refused(good["p_tuning"][0], base_info, "6 virtual tokens", limits=AdapterLimits(max_virtual_tokens=5))
    refused(good["prefix"][0], base_info, "5 virtual tokens", limits=AdapterLimits(max_virtual_tokens=4))


def test_prefix_tuning_is_refused_by_the_padded_engine(good, base):
    """Only the paged runner places a prefix's keys and values; a runtime without one refuses the
    install by name instead of serving the row without its prefix."""
    from adapters.errors import AdapterValidationError

    runtime, _ = make_runtime(base)
    with pytest.raises(AdapterValidationError, match="prefix-tuning adapters need the paged KV cache"):
        runtime.install(load(runtime, good["prefix"][0]))
    assert runtime.prefixes == {} and len(runtime.free_slots) == 8


def test_dora_with_a_zero_norm_row_fails_its_install_only(base, tmp_path):
    """A magnitude over a zero-norm row would be infinite: the install is refused, nothing half-written."""
    runtime, runner = make_runtime(base)
    make_peft_adapter(base, "dora", tmp_path / "d", seed=2, target_modules=["q_proj", "v_proj"])
    weights = load(runtime, tmp_path / "d")
    with torch.no_grad():
        runtime.layer("model.layers.1.self_attn.v_proj").base_layer.weight[0].zero_()
        weights.modules["model.layers.1.self_attn.v_proj"].b[0].zero_()
    from adapters.errors import AdapterValidationError
    with pytest.raises(AdapterValidationError, match="zero norm"):
        runtime.install(weights, slot=1)
    assert "lora" not in runtime.layer(Q).banks or 1 not in runtime.layer(Q).banks["lora"].weights


@pytest.mark.parametrize("kind", ["dora", "adalora", "vera", "p_tuning", "prefix_tuning"])
def test_every_new_kind_is_trainable_and_refuses_foreign_fields(kind):
    """Each new kind trains now (tests/unit/test_train_new_kinds.py); a field of another kind is
    refused by name."""
    assert TrainingConfig(kind=kind).kind.value == kind
    with pytest.raises(ValidationError, match=f"feedforward_modules do\\(es\\) not apply to kind '{kind}'"):
        TrainingConfig(kind=kind, feedforward_modules=["down_proj"])


def test_every_new_kind_served_over_http_gives_peft_greedy_text(tmp_path):
    """Registered from an adapters folder at start, each new kind answers /v1/completions at
    temperature 0 with the text PEFT's greedy decoding gives (cut at the end-of-sequence token)."""
    from fastapi.testclient import TestClient
    from test_api import make_base, make_settings

    from gateway.app import create_app

    tokenizer = build_tokenizer()
    base = build_tiny_llama(len(tokenizer))
    folder = tmp_path / "adapters"
    references = {name: make_peft_adapter(base, kind, folder / name, seed=21 + i, scale=0.5, **overrides)
                  for i, (name, (kind, overrides)) in enumerate(NEW_KINDS.items())}
    prompt = "the quick brown fox"
    ids = tokenizer(prompt)["input_ids"]
    steps = 8
    app = create_app(make_settings(tmp_path / "data", folder), base=make_base(tokenizer))
    with TestClient(app) as client:
        texts = {}
        for name in ["tiny", *references]:
            response = client.post("/v1/completions", json={"model": name, "prompt": prompt, "temperature": 0,
                                                             "max_tokens": steps})
            assert response.status_code == 200, response.text
            texts[name] = response.json()["choices"][0]["text"]
    for name, reference in references.items():
        tokens = ref_greedy(reference, ids, steps)
        if tokenizer.eos_token_id in tokens:
            tokens = tokens[: tokens.index(tokenizer.eos_token_id)]
        assert texts[name] == tokenizer.decode(tokens, skip_special_tokens=True), name
    assert any(texts[name] != texts["tiny"] for name in references)
