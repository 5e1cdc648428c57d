"""read_adapter refuses every unsafe, unsupported or mismatched adapter with a message naming the
problem; good adapters describe themselves and round-trip through write_adapter to PEFT."""

from __future__ import annotations

import copy
import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from support import build_tiny_llama, make_peft_adapter
from safetensors.torch import load_file, save_file

from adapters.errors import AdapterValidationError
from adapters.kinds.base import AdapterLimits
from adapters.peft_io import CONFIG_FILE, WEIGHTS_FILE, read_adapter, write_adapter
from adapters.runtime import AdapterRuntime

KINDS = {
    "lora": ("lora", {}),
    "ia3": ("ia3", {"target_modules": ["k_proj", "v_proj", "down_proj", "up_proj"],
                    "feedforward_modules": ["down_proj", "up_proj"]}),
    "prompt_tuning": ("prompt_tuning", {"num_virtual_tokens": 5}),
}


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
    """kind -> (folder, PEFT reference model)."""
    root = tmp_path_factory.mktemp("good")
    out = {}
    for name, (kind, overrides) in KINDS.items():
        out[name] = (root / name, make_peft_adapter(base, kind, root / name, seed=2, **overrides))
    return out


def read(folder: Path, base_info, limits: AdapterLimits | None = None):
    return read_adapter(folder, base_info, limits or AdapterLimits(), torch.float32)


def mutated(src: Path, dst: Path, config_fn=None, tensors_fn=None) -> Path:
    """Copy a good PEFT folder, applying ``config_fn(config)`` / ``tensors_fn(tensors)`` in place."""
    dst.mkdir(parents=True)
    config = json.loads((src / CONFIG_FILE).read_text())
    tensors = load_file(str(src / WEIGHTS_FILE))
    if config_fn:
        config_fn(config)
    if tensors_fn:
        tensors_fn(tensors)
    (dst / CONFIG_FILE).write_text(json.dumps(config))
    save_file(tensors, str(dst / WEIGHTS_FILE))
    return dst


def refused(folder: Path, base_info, *words: str, limits: AdapterLimits | None = None) -> str:
    with pytest.raises(AdapterValidationError) as info:
        read(folder, base_info, limits)
    message = str(info.value)
    for word in words:
        assert word.lower() in message.lower(), f"{word!r} not in {message!r}"
    return message


def set_key(key, value):
    def fn(config):
        config[key] = value
    return fn


# ---- config refusals -------------------------------------------------------------------------

@pytest.mark.parametrize("key,value,words", [
    ("peft_type", "LOHA", ("LOHA", "peft_type")),
    ("use_dora", True, ("use_dora", "lora_magnitude_vector")),  # DoRA without its magnitudes
    ("modules_to_save", ["lm_head"], ("modules_to_save",)),
    ("rank_pattern", {"q_proj": 8}, ("rank_pattern",)),
    ("alpha_pattern", {"q_proj": 8}, ("alpha_pattern",)),
    ("bias", "all", ("bias",)),
    ("fan_in_fan_out", True, ("fan_in_fan_out",)),
    ("layers_to_transform", [0], ("layers_to_transform",)),
    ("r", "4", ("'r'",)),
    ("task_type", "SEQ_CLS", ("task_type",)),
])
def test_lora_config_refusals(good, base_info, tmp_path, key, value, words):
    folder = mutated(good["lora"][0], tmp_path / "bad", config_fn=set_key(key, value))
    refused(folder, base_info, *words)


def test_pickle_only_is_refused_and_never_loaded(base_info, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / CONFIG_FILE).write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    (folder / "adapter_model.bin").write_bytes(b"this is not a pickle and must never be opened")
    refused(folder, base_info, "adapter_model.bin", "pickle")


def test_missing_weights(base_info, tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / CONFIG_FILE).write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    refused(folder, base_info, WEIGHTS_FILE, "missing")


def test_missing_config(good, base_info, tmp_path):
    folder = tmp_path / "noconfig"
    folder.mkdir()
    shutil.copy(good["lora"][0] / WEIGHTS_FILE, folder / WEIGHTS_FILE)
    refused(folder, base_info, CONFIG_FILE, "missing")


@pytest.mark.parametrize("content,words", [
    (b"{not json", ("not valid JSON",)),
    (b"\xff\xfe garbage", ("not valid JSON",)),
    (b"[1, 2, 3]", ("JSON object",)),
    (b'"LORA"', ("JSON object",)),
])
def test_config_not_a_json_object(good, base_info, tmp_path, content, words):
    folder = tmp_path / "badjson"
    folder.mkdir()
    shutil.copy(good["lora"][0] / WEIGHTS_FILE, folder / WEIGHTS_FILE)
    (folder / CONFIG_FILE).write_bytes(content)
    refused(folder, base_info, *words)


def test_oversized_config(good, base_info, tmp_path):
    folder = mutated(good["lora"][0], tmp_path / "big", config_fn=set_key("base_model_name_or_path", "x" * 70000))
    refused(folder, base_info, "limit")


def with_raw_config(src: Path, dst: Path, text: str) -> Path:
    """A good adapter's tensors beside a config written verbatim (JSON that json.dumps never writes)."""
    dst.mkdir(parents=True)
    shutil.copy(src / WEIGHTS_FILE, dst / WEIGHTS_FILE)
    (dst / CONFIG_FILE).write_text(text)
    return dst


def raw_config_with(src: Path, field: str, raw_value: str) -> str:
    config = json.loads((src / CONFIG_FILE).read_text())
    config[field] = "@@"
    return json.dumps(config).replace('"@@"', raw_value)


@pytest.mark.parametrize("kind,field,raw_value", [
    ("lora", "lora_alpha", "Infinity"),
    ("lora", "lora_alpha", "-Infinity"),
    ("lora", "lora_alpha", "NaN"),
    ("lora", "lora_alpha", "1e999"),  # parses as inf
    ("lora", "lora_alpha", "1" * 400),  # float() of it raised OverflowError
    ("lora", "r", "9" * 5000),  # int() of it raised ValueError (Python's 4300-digit limit)
    ("lora", "lora_alpha", "1e7"),  # finite, but far past any real alpha
    ("lora", "lora_dropout", "1.5"),
    ("ia3", "init_ia3_weights", "NaN"),  # even a field with no effect must not hold one
    ("prompt_tuning", "num_virtual_tokens", "Infinity"),
    ("prompt_tuning", "token_dim", "99999999999999999999999"),
], ids=lambda v: v[:12])
def test_numbers_must_be_finite_and_in_range(good, base_info, tmp_path, kind, field, raw_value):
    src = good[kind][0]
    folder = with_raw_config(src, tmp_path / "num", raw_config_with(src, field, raw_value))
    refused(folder, base_info, f"'{field}'")


def test_deeply_nested_config_is_refused_by_name(good, base_info, tmp_path):
    src = good["lora"][0]
    deep = "[" * 30000 + "]" * 30000  # under the size limit; json.loads raised RecursionError
    folder = with_raw_config(src, tmp_path / "deep", raw_config_with(src, "revision", deep))
    refused(folder, base_info, CONFIG_FILE, "deeper than")
    # brackets inside strings are text, not nesting
    folder = with_raw_config(src, tmp_path / "text", raw_config_with(src, "revision", json.dumps("[" * 100)))
    read(folder, base_info)


def test_alpha_overflowing_the_serving_dtype_is_refused(base, base_info, tmp_path):
    make_peft_adapter(base, "lora", tmp_path / "a", seed=5, r=1, lora_alpha=1e6, target_modules=["q_proj"])
    read(tmp_path / "a", base_info)  # fine in float32
    with pytest.raises(AdapterValidationError, match="beyond the range of torch.float16"):
        read_adapter(tmp_path / "a", base_info, AdapterLimits(), torch.float16)


def test_missing_peft_type(good, base_info, tmp_path):
    folder = mutated(good["lora"][0], tmp_path / "nopt", config_fn=lambda c: c.pop("peft_type"))
    refused(folder, base_info, "peft_type")


# ---- limits ----------------------------------------------------------------------------------

def test_lora_rank_above_limit(good, base_info):
    refused(good["lora"][0], base_info, "rank 4", "limit of 2", limits=AdapterLimits(max_lora_rank=2))
    read(good["lora"][0], base_info, AdapterLimits(max_lora_rank=4))  # at the limit is fine


def test_virtual_tokens_above_limit(good, base_info):
    refused(good["prompt_tuning"][0], base_info, "5 virtual tokens", "limit of 4",
            limits=AdapterLimits(max_virtual_tokens=4))
    read(good["prompt_tuning"][0], base_info, AdapterLimits(max_virtual_tokens=5))


def test_adapter_bytes_above_limit(good, base_info):
    with pytest.raises(AdapterValidationError):
        read(good["lora"][0], base_info, AdapterLimits(max_adapter_bytes=100))


# ---- tensor refusals ---------------------------------------------------------------------------

def rename_layer(tensors):
    for key in [k for k in tensors if ".layers.1.self_attn.q_proj." in k]:
        tensors[key.replace(".layers.1.", ".layers.9.")] = tensors.pop(key)


def test_target_module_missing_from_base(good, base_info, tmp_path):
    folder = mutated(good["lora"][0], tmp_path / "l", tensors_fn=rename_layer)
    refused(folder, base_info, "model.layers.9.self_attn.q_proj", "does not exist")
    folder = mutated(good["ia3"][0], tmp_path / "i", tensors_fn=lambda t: [
        t.__setitem__(k.replace(".layers.1.", ".layers.9."), t.pop(k))
        for k in [k for k in list(t) if ".layers.1.self_attn.k_proj." in k]])
    refused(folder, base_info, "model.layers.9.self_attn.k_proj", "does not exist")


def test_lora_a_with_wrong_in_features(good, base_info, tmp_path):
    def fn(tensors):
        key = next(k for k in tensors if k.endswith("layers.0.self_attn.q_proj.lora_A.weight"))
        tensors[key] = torch.randn(tensors[key].shape[0], tensors[key].shape[1] + 1)
    folder = mutated(good["lora"][0], tmp_path / "shape", tensors_fn=fn)
    refused(folder, base_info, "model.layers.0.self_attn.q_proj", "lora_A (4, 33)")


def test_lora_rank_disagrees_with_config(good, base_info, tmp_path):
    folder = mutated(good["lora"][0], tmp_path / "rank", config_fn=set_key("r", 3))
    refused(folder, base_info, "rank 3")


def test_lora_half_pair(good, base_info, tmp_path):
    def fn(tensors):
        tensors.pop(next(k for k in tensors if k.endswith("layers.0.mlp.up_proj.lora_B.weight")))
    folder = mutated(good["lora"][0], tmp_path / "half", tensors_fn=fn)
    refused(folder, base_info, "model.layers.0.mlp.up_proj", "only one")


def test_ia3_wrong_side_shape(good, base_info, tmp_path):
    # declaring k_proj feed-forward makes its (out, 1) vector the wrong shape for an input scale
    folder = mutated(good["ia3"][0], tmp_path / "ff",
                     config_fn=set_key("feedforward_modules", ["down_proj", "up_proj", "k_proj"]))
    refused(folder, base_info, "k_proj", "ia3_l has shape")


@pytest.mark.parametrize("kind", ["lora", "ia3", "prompt_tuning"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_tensor(good, base_info, tmp_path, kind, bad):
    def fn(tensors):
        key = sorted(tensors)[0]
        tensors[key] = tensors[key].clone()
        tensors[key].view(-1)[0] = bad
    folder = mutated(good[kind][0], tmp_path / "nan", tensors_fn=fn)
    refused(folder, base_info, "NaN or infinite")


def test_integer_tensor(good, base_info, tmp_path):
    def fn(tensors):
        key = sorted(tensors)[0]
        tensors[key] = torch.zeros(tensors[key].shape, dtype=torch.int32)
    folder = mutated(good["lora"][0], tmp_path / "int", tensors_fn=fn)
    refused(folder, base_info, "dtype")


def test_prompt_embeddings_wrong_hidden_size(good, base_info, tmp_path):
    def fn(tensors):
        tensors["prompt_embeddings"] = torch.randn(5, 48)
    folder = mutated(good["prompt_tuning"][0], tmp_path / "hid", tensors_fn=fn)
    refused(folder, base_info, "prompt_embeddings has shape (5, 48)", "(5, 32)")


def test_prompt_token_dim_mismatch(good, base_info, tmp_path):
    folder = mutated(good["prompt_tuning"][0], tmp_path / "td", config_fn=set_key("token_dim", 48))
    refused(folder, base_info, "token_dim")


def test_prompt_extra_tensor(good, base_info, tmp_path):
    def fn(tensors):
        tensors["extra"] = torch.zeros(2)
    folder = mutated(good["prompt_tuning"][0], tmp_path / "x", tensors_fn=fn)
    refused(folder, base_info, "prompt_embeddings")


@pytest.mark.parametrize("suffix", ["lora_A.default.weight", "lora_magnitude_vector", "lora_A.bias"])
def test_lora_unexpected_suffix(good, base_info, tmp_path, suffix):
    def fn(tensors):
        key = next(k for k in tensors if k.endswith("layers.0.self_attn.q_proj.lora_A.weight"))
        tensors[key.replace("lora_A.weight", suffix)] = tensors.pop(key)
    folder = mutated(good["lora"][0], tmp_path / "suffix", tensors_fn=fn)
    refused(folder, base_info, "unexpected tensor", suffix)


def test_lora_without_prefix(good, base_info, tmp_path):
    def fn(tensors):
        for key in list(tensors):
            tensors[key.removeprefix("base_model.model.")] = tensors.pop(key)
    folder = mutated(good["lora"][0], tmp_path / "nopre", tensors_fn=fn)
    refused(folder, base_info, "unexpected tensor")


def test_lora_on_lm_head_is_refused(good, base_info, tmp_path):
    def fn(tensors):
        tensors["base_model.model.lm_head.lora_A.weight"] = torch.randn(4, 32)
        tensors["base_model.model.lm_head.lora_B.weight"] = torch.randn(320, 4)
    folder = mutated(good["lora"][0], tmp_path / "head", tensors_fn=fn)
    refused(folder, base_info, "lm_head")


def test_empty_tensor_file(good, base_info, tmp_path):
    for kind in ("lora", "ia3"):
        folder = mutated(good[kind][0], tmp_path / kind, tensors_fn=lambda t: t.clear())
        with pytest.raises(AdapterValidationError):
            read(folder, base_info)


# ---- happy paths -------------------------------------------------------------------------------

def test_describe_each_kind(good, base_info):
    lora = read(good["lora"][0], base_info).describe()
    assert lora == {"kind": "lora", "rank": 4, "target_modules": [
        "down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]}
    ia3 = read(good["ia3"][0], base_info).describe()
    assert ia3 == {"kind": "ia3", "target_modules": ["down_proj", "k_proj", "up_proj", "v_proj"]}
    prompt = read(good["prompt_tuning"][0], base_info).describe()
    assert prompt == {"kind": "prompt_tuning", "num_virtual_tokens": 5, "target_modules": []}


def test_weights_are_parsed_as_documented(good, base_info):
    lora = read(good["lora"][0], base_info)
    q = lora.modules["model.layers.0.self_attn.q_proj"]
    assert q.a.shape == (4, 32) and q.b.shape == (32, 4) and q.scale == pytest.approx(2.0) and q.magnitude is None
    ia3 = read(good["ia3"][0], base_info)
    assert ia3.modules["model.layers.0.mlp.down_proj"].feedforward is True
    assert ia3.modules["model.layers.0.self_attn.k_proj"].feedforward is False
    assert ia3.modules["model.layers.0.mlp.down_proj"].vector.shape == (64,)
    assert read(good["prompt_tuning"][0], base_info).prompt.shape == (5, 32)


@pytest.mark.parametrize("kind", list(KINDS))
def test_write_adapter_round_trip_through_peft(good, base, base_info, tmp_path, kind):
    from peft import PeftModel

    folder, reference = good[kind]
    weights = read(folder, base_info)
    out = tmp_path / "written"
    write_adapter(weights, out)
    assert sorted(p.name for p in out.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), out).eval()
    ids = torch.tensor([[5, 17, 99, 42, 7, 250, 3]])
    with torch.no_grad():
        want = reference(input_ids=ids).logits
        got = reloaded(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # and it reads back the same
    again = read(out, base_info)
    assert again.describe() == weights.describe()
    for x, y in zip(again.tensors(), weights.tensors(), strict=True):
        torch.testing.assert_close(x, y)


def test_write_adapter_round_trip_rslora(base, base_info, tmp_path):
    from peft import PeftModel

    reference = make_peft_adapter(base, "lora", tmp_path / "rs", seed=4, r=8, lora_alpha=16, use_rslora=True,
                                  target_modules=["q_proj", "v_proj"])
    write_adapter(read(tmp_path / "rs", base_info), tmp_path / "out")
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "out").eval()
    ids = torch.tensor([[5, 17, 99, 42]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, reference(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)


# ---- config and tensors must agree (PEFT's matching rule) ------------------------------------

def drop_modules(*names: str):
    def fn(tensors):
        for key in [k for k in tensors if any(f".{n}." in k for n in names)]:
            tensors.pop(key)
    return fn


@pytest.mark.parametrize("kind,config_fn,tensors_fn,words", [
    # tensors adapt every linear layer, the config targets two: PEFT drops the others silently
    ("lora", set_key("target_modules", ["q_proj", "v_proj"]), None, ("does not target", "o_proj")),
    ("lora", set_key("target_modules", r".*\.(q|k|v|o)_proj"), None, ("does not target", "mlp")),
    ("lora", set_key("exclude_modules", ["up_proj"]), None, ("does not target", "up_proj")),
    ("lora", set_key("exclude_modules", r".*layers\.1\..*"), None, ("does not target", "layers.1")),
    # the config targets modules without tensors: PEFT keeps them at their initial weights
    ("lora", None, drop_modules("gate_proj"), ("holds no weights", "gate_proj")),
    ("ia3", set_key("target_modules", ["k_proj", "v_proj", "down_proj", "up_proj", "q_proj"]), None,
     ("holds no weights", "q_proj")),
    ("ia3", set_key("target_modules", ["k_proj", "down_proj", "up_proj"]), None, ("does not target", "v_proj")),
    # PEFT's own checks
    ("ia3", set_key("feedforward_modules", ["down_proj", "up_proj", "gate_proj"]), None,
     ("feedforward_modules", "gate_proj", "not among")),
    ("ia3", lambda c: c.pop("feedforward_modules"), None, ("feedforward_modules",)),
    ("lora", set_key("target_modules", None), None, ("names no target_modules",)),
    ("lora", set_key("target_modules", r"(.*)\1"), None, ("target_modules", "backreferences")),
])
def test_config_and_tensors_must_agree(good, base_info, tmp_path, kind, config_fn, tensors_fn, words):
    folder = mutated(good[kind][0], tmp_path / "mismatch", config_fn=config_fn, tensors_fn=tensors_fn)
    refused(folder, base_info, *words)


def test_peft_itself_serves_a_mismatched_adapter_differently(good, base, tmp_path):
    """Why the agreement is required: PEFT drops untargeted tensors and warns about missing ones."""
    from peft import PeftModel

    folder = mutated(good["lora"][0], tmp_path / "q", config_fn=set_key("target_modules", ["q_proj"]))
    model = PeftModel.from_pretrained(copy.deepcopy(base), folder)
    adapted = {name.split(".lora_A")[0] for name, _ in model.named_parameters() if "lora_A" in name}
    assert adapted and all(name.endswith("q_proj") for name in adapted)
    folder = mutated(good["lora"][0], tmp_path / "missing", tensors_fn=drop_modules("gate_proj"))
    with pytest.warns(UserWarning, match="missing adapter keys"):
        PeftModel.from_pretrained(copy.deepcopy(base), folder)


def test_patterns_that_agree_are_accepted(good, base_info, tmp_path):
    config_fn = lambda c: c.update(target_modules=r"model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj",  # noqa: E731
                                   exclude_modules=["gate_proj"])
    folder = mutated(good["lora"][0], tmp_path / "re", config_fn=config_fn, tensors_fn=drop_modules("gate_proj"))
    assert read(folder, base_info).describe()["target_modules"] == [
        "down_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    folder = mutated(good["ia3"][0], tmp_path / "ia3re", config_fn=lambda c: c.update(
        target_modules=r".*\.(k_proj|v_proj|down_proj|up_proj)", feedforward_modules=r".*mlp\..*"))
    assert read(folder, base_info).modules["model.layers.0.mlp.up_proj"].feedforward is True
