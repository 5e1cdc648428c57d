"""Tests of adapters.safetensors_check: valid files pass, every malformed layout is refused."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import pytest
import safetensors
import torch
from safetensors.torch import save_file

from adapters.errors import AdapterValidationError
from adapters.safetensors_check import TensorInfo, load_checked_tensors, read_safetensors_header

LIMIT = 1024 * 1024


def raw_file(header: Any, data: bytes = b"", *, length: int | None = None) -> bytes:
    """8-byte length + header + data; ``header`` may be raw bytes to build malformed JSON."""
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(body) if length is None else length) + body + data


def entry(dtype: str, shape: list[int], begin: int, end: int) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


@pytest.fixture
def valid(tmp_path: Path) -> Path:
    path = tmp_path / "adapter_model.safetensors"
    save_file(
        {"lora_A.weight": torch.randn(4, 8), "lora_B.weight": torch.zeros(8, 4, dtype=torch.float16)},
        str(path),
        metadata={"format": "pt"},
    )
    return path


def test_valid_file_passes_and_loads(valid: Path) -> None:
    header = read_safetensors_header(valid, LIMIT)
    assert header == {
        "lora_A.weight": TensorInfo("F32", (4, 8), 128),
        "lora_B.weight": TensorInfo("F16", (8, 4), 64),
    }
    tensors = load_checked_tensors(valid, LIMIT)
    assert tensors["lora_B.weight"].dtype == torch.float16 and tensors["lora_A.weight"].shape == (4, 8)


def test_zero_sized_tensor_is_fine(tmp_path: Path) -> None:
    path = tmp_path / "z.safetensors"
    path.write_bytes(raw_file({"e": entry("F32", [0, 3], 0, 0), "a": entry("U8", [2], 0, 2)}, b"ab"))
    assert read_safetensors_header(path, LIMIT)["e"].nbytes == 0


A_JSON = json.dumps(entry("F32", [2], 0, 8)).encode()
GOOD_HEADER = {"a": entry("F32", [2], 0, 8), "b": entry("F16", [2], 8, 12)}
CASES: dict[str, tuple[bytes, str]] = {
    "too short": (b"\x01\x00", "shorter than the 8-byte"),
    "header length past end": (raw_file(GOOD_HEADER, bytes(12), length=10_000), "past the end"),
    "header length over 100MB": (raw_file(GOOD_HEADER, bytes(12), length=200_000_000), "over the limit"),
    "header length over 16MiB": (raw_file(GOOD_HEADER, bytes(12), length=17 << 20), "over the limit"),
    "garbage json": (raw_file(b"{not json"), "not valid JSON"),
    "invalid utf-8": (raw_file(b'{"\xff": 1}'), "UTF-8"),
    "not an object": (raw_file([1, 2]), "not a JSON object"),
    "duplicate key": (raw_file(b'{"a": %s, "a": %s}' % (A_JSON, A_JSON), bytes(8)), "repeats a key"),
    "overlap": (raw_file({"a": entry("F32", [2], 0, 8), "b": entry("F32", [2], 4, 12)}, bytes(12)), "overlap"),
    "wrong byte count": (raw_file({"a": entry("F32", [3], 0, 8)}, bytes(8)), "need 12"),
    "unknown dtype": (raw_file({"a": entry("F8_E4M3", [8], 0, 8)}, bytes(8)), "unsupported dtype"),
    "object dtype": (raw_file({"a": entry("O", [1], 0, 8)}, bytes(8)), "unsupported dtype"),
    "gap": (raw_file({"a": entry("F32", [1], 0, 4), "b": entry("F32", [1], 8, 12)}, bytes(12)), "unaccounted"),
    "trailing bytes": (raw_file(GOOD_HEADER, bytes(12) + b"junk"), "4 trailing bytes"),
    "truncated data": (raw_file(GOOD_HEADER, bytes(9)), "past the 9-byte data section"),
    "negative dim": (raw_file({"a": entry("F32", [-1], 0, 4)}, bytes(4)), "non-negative"),
    "bool dim": (raw_file({"a": entry("F32", [True], 0, 4)}, bytes(4)), "non-negative"),
    "float offsets": (raw_file({"a": {**entry("F32", [1], 0, 4), "data_offsets": [0.0, 4.0]}}, bytes(4)), "pair of"),
    "reversed offsets": (raw_file({"a": entry("F32", [0], 4, 0)}, bytes(4)), "out of order"),
    "extra key": (raw_file({"a": {**entry("F32", [1], 0, 4), "x": 1}}, bytes(4)), "exactly the keys"),
    "entry not object": (raw_file({"a": [1]}), "exactly the keys"),
    "bad metadata": (raw_file({"__metadata__": {"k": 1}, **GOOD_HEADER}, bytes(12)), "strings to strings"),
    "nan": (raw_file(b'{"__metadata__": {"k": NaN}}'), "not valid JSON"),
    "nine dims": (raw_file({"a": entry("U8", [1] * 9, 0, 1)}, bytes(1)), "at most 8 dimensions"),
    # thousands of huge dimensions: the size product alone would take hours (here: a 4300-digit number)
    "many huge dims": (raw_file({"a": entry("U8", [2**40 - 1] * 5000, 0, 1)}, bytes(1)), "at most 8 dimensions"),
    "huge dim": (raw_file({"a": entry("U8", [0, 10**300], 0, 0), "b": entry("U8", [1], 0, 1)}, bytes(1)),
                 "up to 1099511627776"),
    "huge offset": (raw_file(b'{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1%s]}}' % (b"0" * 4000),
                             bytes(1)), "run past the 1-byte"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_files_are_refused(case: str, tmp_path: Path) -> None:
    content, expected = CASES[case]
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(AdapterValidationError, match=expected):
        read_safetensors_header(path, LIMIT)
    with pytest.raises(AdapterValidationError):
        load_checked_tensors(path, LIMIT)  # the loader must refuse before touching the data


def test_truncated_real_file(valid: Path) -> None:
    valid.write_bytes(valid.read_bytes()[:-3])
    with pytest.raises(AdapterValidationError, match="data section"):
        read_safetensors_header(valid, LIMIT)


def test_file_over_size_limit(valid: Path) -> None:
    with pytest.raises(AdapterValidationError, match="over the limit of 100"):
        read_safetensors_header(valid, 100)


def test_too_many_tensors(tmp_path: Path) -> None:
    path = tmp_path / "many.safetensors"
    path.write_bytes(raw_file({f"t{i}": entry("U8", [1], i, i + 1) for i in range(5)}, bytes(5)))
    assert len(read_safetensors_header(path, LIMIT, max_tensors=5)) == 5
    with pytest.raises(AdapterValidationError, match="more than 4 tensors"):
        read_safetensors_header(path, LIMIT, max_tensors=4)


def test_hostile_tensor_name_not_echoed(tmp_path: Path) -> None:
    path = tmp_path / "n.safetensors"
    path.write_bytes(raw_file({"<script>SECRET": entry("F32", [3], 0, 8)}, bytes(8)))
    with pytest.raises(AdapterValidationError) as err:
        read_safetensors_header(path, LIMIT)
    assert "SECRET" not in str(err.value) and "tensor #0" in str(err.value)


def test_library_error_becomes_validation_error(valid: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_args: Any, **_kwargs: Any) -> None:
        raise safetensors.SafetensorError("boom")

    monkeypatch.setattr("safetensors.torch.load_file", broken)
    with pytest.raises(AdapterValidationError, match="SafetensorError"):
        load_checked_tensors(valid, LIMIT)


def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo.safetensors")
    with pytest.raises(AdapterValidationError, match="not a regular file"):
        read_safetensors_header(tmp_path / "fifo.safetensors", LIMIT)
