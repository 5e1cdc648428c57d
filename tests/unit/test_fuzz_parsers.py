"""Property tests of every parser that reads untrusted bytes: the safetensors header, archive
extraction (zip and tar), adapter configs of every kind, and the training JSONL parser.

The rule for each: success or the typed error (AdapterValidationError / DatasetValidationError);
never another exception; nothing left on disk by a refusal. Example counts: tests/fuzz_settings.py.
"""

from __future__ import annotations

import io
import json
import struct
import tarfile
import tempfile
import zipfile
from pathlib import Path

import pytest
import torch
from fuzz_settings import fuzz
from hypothesis import given
from hypothesis import strategies as st
from test_adapter_validation import KINDS, base, base_info, good  # noqa: F401 - fixtures reused

from adapters.archive import ArchiveLimits, extract_adapter_archive
from adapters.errors import AdapterValidationError, DatasetValidationError
from adapters.kinds.base import AdapterLimits
from adapters.peft_io import CONFIG_FILE, WEIGHTS_FILE, read_adapter
from adapters.safetensors_check import DTYPE_SIZES, read_safetensors_header
from adapters.training_data import parse_dataset

# ---- shared strategies ---------------------------------------------------------------------------
# numbers JSON can spell but Python's json module treats specially, or that overflow a float / int()
RAW_NUMBERS = ["NaN", "Infinity", "-Infinity", "1e999", "-1e999", "1" * 400, "9" * 5000, "-0", "1e-400",
               "0.1e1", "4.9e-324"]
json_scalars = (st.none() | st.booleans() | st.integers(min_value=-(10**40), max_value=10**40)
                | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=16)
raw_tokens = (st.sampled_from(RAW_NUMBERS)
              | st.integers(min_value=1, max_value=4000).map(lambda n: "[" * n + "]" * n)
              | st.integers(min_value=1, max_value=4000).map(lambda n: '{"a":' * n + "1" + "}" * n))


def mutate(data: bytes, draw) -> bytes:
    """Flip, cut or splice a few bytes of ``data``."""
    data = bytearray(data)
    for _ in range(draw(st.integers(0, 4))):
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        action = draw(st.sampled_from(["flip", "cut", "insert"]))
        if action == "flip":
            data[at] ^= draw(st.integers(1, 255))
        elif action == "cut":
            del data[at:at + draw(st.integers(1, 64))]
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
    return bytes(data)


def listing(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


# ---- safetensors header ------------------------------------------------------------------------
shapes = (st.lists(st.integers(min_value=0, max_value=2**64), max_size=12)
          | st.lists(st.integers(min_value=-2, max_value=8) | st.booleans() | st.floats(), max_size=4)
          | st.sampled_from([9, 500, 3000]).map(lambda n: [2**40 - 1] * n) | json_values)
offsets = st.lists(st.integers(min_value=0, max_value=256) | st.integers(min_value=-5, max_value=2**70),
                   min_size=2, max_size=2)
entries = st.fixed_dictionaries({
    "dtype": st.sampled_from(sorted(DTYPE_SIZES)) | st.sampled_from(["F8_E4M3", "O", ""]) | json_scalars,
    "shape": shapes,
    "data_offsets": offsets | offsets | json_values,  # mostly well-formed, so the checks after it run
})


@st.composite
def safetensors_files(draw) -> bytes:
    shape_style = draw(st.sampled_from(["structured", "structured", "valid-mutated", "raw"]))
    if shape_style == "raw":
        return draw(st.binary(max_size=2048))
    if shape_style == "valid-mutated":
        names = draw(st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=4, unique=True))
        header, data, offset = {}, b"", 0
        for name in names:
            dtype = draw(st.sampled_from(sorted(DTYPE_SIZES)))
            dims = draw(st.lists(st.integers(0, 4), max_size=3))
            size = DTYPE_SIZES[dtype] * int(torch.tensor(dims).prod()) if dims else DTYPE_SIZES[dtype]
            header[name] = {"dtype": dtype, "shape": dims, "data_offsets": [offset, offset + size]}
            offset += size
        data = bytes(offset)
        body = json.dumps(header).encode()
        return mutate(struct.pack("<Q", len(body)) + body + data, draw)
    header = draw(st.dictionaries(st.text(max_size=8), entries | json_values, max_size=5)
                  if draw(st.booleans()) else st.dictionaries(st.text(max_size=8), entries, min_size=1, max_size=3))
    body = json.dumps(header).encode()
    length = draw(st.sampled_from([len(body)] * 4 + [len(body) + 1, 0, 2**63, 17 << 20]))
    return struct.pack("<Q", length) + body + draw(st.binary(max_size=256))


@fuzz
@given(content=safetensors_files())
def test_safetensors_header_parser(content: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / WEIGHTS_FILE
        path.write_bytes(content)
        try:
            header = read_safetensors_header(path, max_file_bytes=1 << 20)
        except AdapterValidationError:
            return
        data_len = len(content) - 8 - int.from_bytes(content[:8], "little")
        assert sum(info.nbytes for info in header.values()) == data_len  # accepted: tensors tile the data


# ---- archives ------------------------------------------------------------------------------------
GOOD_FILES = {"adapter_config.json": b'{"peft_type": "LORA"}', "adapter_model.safetensors": b"\x00" * 64}
member_names = (st.sampled_from([*GOOD_FILES, "README.md", "a/adapter_config.json", "a/adapter_model.safetensors",
                                 "../adapter_config.json", "/etc/passwd", "a\\b", "x.bin", "a/b/c", "", ".",
                                 "a/", "adapter_config.json\x00.txt", "C:/x"])
                | st.text(max_size=20))
members = st.lists(st.tuples(member_names, st.binary(max_size=200)), max_size=6) \
    | st.just(list(GOOD_FILES.items())) \
    | st.lists(st.just(("README.md", b"")), min_size=17, max_size=40)
TAR_TYPES = [tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.FIFOTYPE, tarfile.CHRTYPE,
             tarfile.GNUTYPE_SPARSE, b"Z"]


def build_zip(items, draw) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", draw(st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED]))) as zf:
        for name, data in items:
            info = zipfile.ZipInfo(name or "x")
            info.external_attr = draw(st.sampled_from([0, 0o100644 << 16, 0o120777 << 16, 0o020644 << 16]))
            info.comment = draw(st.sampled_from([b"", b"c" * 30000]))
            zf.writestr(info, data)
    return buffer.getvalue()


def build_tar(items, draw) -> bytes:
    buffer = io.BytesIO()
    mode = draw(st.sampled_from(["w", "w:gz"]))
    with tarfile.open(fileobj=buffer, mode=mode, format=draw(st.sampled_from([tarfile.PAX_FORMAT,
                                                                               tarfile.GNU_FORMAT]))) as tf:
        for name, data in items:
            info = tarfile.TarInfo(name or "x")
            info.type = draw(st.sampled_from(TAR_TYPES[:1] * 4 + TAR_TYPES))
            info.linkname = "/etc/passwd" if info.type in (tarfile.SYMTYPE, tarfile.LNKTYPE) else ""
            info.size = len(data) if info.type == tarfile.REGTYPE else 0
            tf.addfile(info, io.BytesIO(data) if info.type == tarfile.REGTYPE else None)
    return buffer.getvalue()


@st.composite
def archives(draw) -> bytes:
    kind = draw(st.sampled_from(["zip", "tar", "raw"]))
    if kind == "raw":
        return draw(st.binary(max_size=2048))
    try:
        built = (build_zip if kind == "zip" else build_tar)(draw(members), draw)
    except (ValueError, tarfile.TarError, UnicodeError):  # a name the writer itself refuses
        built = build_zip(list(GOOD_FILES.items()), draw)
    return mutate(built, draw) if draw(st.booleans()) else built


@fuzz
@given(content=archives())
def test_archive_extraction(content: bytes) -> None:
    limits = ArchiveLimits(max_members=16, max_member_bytes=64 * 1024, max_total_bytes=128 * 1024)
    with tempfile.TemporaryDirectory() as tmp:
        upload, dest = Path(tmp) / "upload", Path(tmp) / "out"
        upload.write_bytes(content)
        dest.mkdir()
        try:
            extract_adapter_archive(upload, dest, limits)
        except AdapterValidationError:
            assert listing(dest) == set()  # a refusal leaves nothing behind
            return
        assert listing(dest) == {CONFIG_FILE, WEIGHTS_FILE}


# ---- adapter configs (every kind, through the full reader) ---------------------------------------
CONFIG_KEYS = ["peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules",
               "feedforward_modules", "use_rslora", "bias", "fan_in_fan_out", "num_virtual_tokens", "token_dim",
               "num_transformer_submodules", "use_dora", "modules_to_save", "layers_to_transform", "rank_pattern",
               "revision", "init_lora_weights"]
patterns = st.text(alphabet="()[]{}*+?|.\\^$_-abdgkmopqruvw0129", max_size=40)
config_values = (json_values | patterns | st.lists(st.sampled_from(
    ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj", "up_proj", "gate_proj", "lm_head", "proj", ""]), max_size=8)
    | raw_tokens.map(lambda raw: ("@RAW@", raw)))


@st.composite
def config_texts(draw, original: dict) -> str:
    if draw(st.integers(0, 9)) == 0:  # sometimes: arbitrary bytes-ish text
        return draw(st.text(max_size=300))
    config = dict(original)
    raws: list[str] = []
    for key in draw(st.lists(st.sampled_from(CONFIG_KEYS) | st.text(max_size=6), max_size=4)):
        if draw(st.integers(0, 4)) == 0:
            config.pop(key, None)
            continue
        value = draw(config_values)
        if isinstance(value, tuple):  # a raw JSON token that json.dumps would never write
            raws.append(value[1])
            value = f"@RAW{len(raws) - 1}@"
        config[key] = value
    text = json.dumps(config)
    for i, raw in enumerate(raws):
        text = text.replace(f'"@RAW{i}@"', raw)
    return text


@pytest.mark.parametrize("kind", list(KINDS))
@fuzz
@given(data=st.data())
def test_adapter_config_reader(good, base_info, kind, data) -> None:  # noqa: F811 - fixtures
    folder = good[kind][0]
    original = json.loads((folder / CONFIG_FILE).read_text())
    text = data.draw(config_texts(original))
    with tempfile.TemporaryDirectory() as tmp:
        adapter = Path(tmp)
        (adapter / WEIGHTS_FILE).write_bytes((folder / WEIGHTS_FILE).read_bytes())
        (adapter / CONFIG_FILE).write_text(text, errors="surrogatepass")
        before = listing(adapter)
        try:
            weights = read_adapter(adapter, base_info, AdapterLimits(), torch.float32)
        except AdapterValidationError:
            pass
        else:
            assert all(bool(torch.isfinite(t).all()) for t in weights.tensors())
            alpha = weights.config.get("lora_alpha", 8)
            assert isinstance(alpha, (int, float)) and abs(alpha) <= 1e6
        assert listing(adapter) == before


# ---- training JSONL ------------------------------------------------------------------------------
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "tool", ""])
                                           | json_values, "content": st.text(max_size=20) | json_values}),
                    max_size=5)
records = (st.fixed_dictionaries({"messages": messages | json_values})
           | st.fixed_dictionaries({"prompt": st.text(max_size=20) | json_values,
                                    "completion": st.text(max_size=20) | json_values})
           | st.fixed_dictionaries({"instruction": st.text(max_size=20) | json_values,
                                    "output": st.text(max_size=20) | json_values},
                                   optional={"input": st.text(max_size=10) | json_values})
           | json_values)
lines = (records.map(lambda r: json.dumps(r).encode()) | raw_tokens.map(str.encode)
         | st.binary(max_size=80) | st.just(b"\xef\xbb\xbf{}") | st.just(b""))


@fuzz
@given(rows=st.lists(lines, max_size=12), strict=st.booleans())
def test_training_jsonl_parser(rows: list[bytes], strict: bool) -> None:
    data = b"\n".join(rows)
    try:
        parsed = parse_dataset(data, max_lines=8, max_line_bytes=4096, strict=strict)
    except DatasetValidationError:
        return
    assert parsed.conversations and parsed.format in ("chat", "prompt_completion", "instruction")
    for conversation in parsed.conversations:
        assert all(isinstance(m["content"], str) and m["role"] in ("system", "user", "assistant")
                   for m in conversation)
