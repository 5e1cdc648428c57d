"""Structural check of an untrusted .safetensors file before any tensor is loaded.

The header is parsed in pure Python and every byte of the file must be accounted for: one
8-byte header length, the JSON header, then tensors that tile the data section exactly, in
order, without gaps or overlap. Only a file that passes is handed to ``safetensors.torch``.
Messages name tensors only when the name is a plain identifier-like string, so a hostile
header is never echoed back.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapters.errors import AdapterValidationError

if TYPE_CHECKING:  # torch is imported lazily: the header check alone must not need it
    import torch

logger = logging.getLogger(__name__)

# The safetensors library allows 100 MB of header; an adapter's needs far less (about 150 bytes per
# tensor, and max_tensors bounds the count), and the whole header is parsed in memory before any check.
MAX_HEADER_BYTES = 16 * 1024 * 1024
# Bounds checked before any arithmetic on a shape: a header listing millions of dimensions (or
# thousand-digit ones) would otherwise make the size product run for hours and the message
# formatting fail. Adapter tensors have 1 or 2 dimensions; 8 leaves room for any real layout.
MAX_NDIM = 8
MAX_DIM = 1 << 40
METADATA_KEY = "__metadata__"

# Element size in bytes of every dtype we accept. Adapters hold floats; the integer and bool
# types are accepted because they are harmless to load and some tools store small index tensors.
DTYPE_SIZES: dict[str, int] = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}
_ENTRY_KEYS = frozenset({"dtype", "shape", "data_offsets"})
_PLAIN = re.compile(r"[A-Za-z0-9_.\-]{1,200}")


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


def _fail(message: str) -> AdapterValidationError:
    return AdapterValidationError(f"invalid safetensors file: {message}")


def _label(name: str, index: int) -> str:
    """How a tensor is named in messages: by name if it is plain, else by position."""
    return f"tensor {name!r}" if _PLAIN.fullmatch(name) else f"tensor #{index}"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is not a size


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Duplicate keys mean different parsers may see different tensors: refuse the ambiguity.
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("duplicate key")
    return result


def _refuse_constant(_name: str) -> Any:
    raise ValueError("NaN/Infinity are not JSON")


def _parse_header(raw: bytes) -> dict[str, Any]:
    try:
        header = json.loads(
            raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys, parse_constant=_refuse_constant
        )
    except UnicodeDecodeError:
        raise _fail("header is not valid UTF-8") from None
    except (ValueError, RecursionError):  # JSONDecodeError is a ValueError
        raise _fail("header is not valid JSON (or repeats a key)") from None
    if not isinstance(header, dict):
        raise _fail("header is not a JSON object")
    return header


def _check_entry(name: str, index: int, entry: Any, data_len: int) -> tuple[TensorInfo, int, int]:
    label = _label(name, index)
    if not isinstance(entry, dict) or set(entry) != _ENTRY_KEYS:
        raise _fail(f"{label} must have exactly the keys dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise _fail(f"{label} has an unsupported dtype (allowed: {', '.join(DTYPE_SIZES)})")
    if not isinstance(shape, list) or len(shape) > MAX_NDIM:
        raise _fail(f"{label} shape is not a list of at most {MAX_NDIM} dimensions")
    if not all(_is_int(d) and 0 <= d <= MAX_DIM for d in shape):
        raise _fail(f"{label} shape is not a list of non-negative integers up to {MAX_DIM}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        raise _fail(f"{label} data_offsets is not a pair of integers")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise _fail(f"{label} data_offsets are out of order or negative")
    if end > data_len:  # before any arithmetic or formatting: an offset may have thousands of digits
        raise _fail(f"{label} data_offsets run past the {data_len}-byte data section")
    nbytes = math.prod(shape) * DTYPE_SIZES[dtype]  # at most MAX_NDIM factors of at most MAX_DIM
    if end - begin != nbytes:
        raise _fail(f"{label} spans {end - begin} bytes but its dtype and shape need {nbytes}")
    return TensorInfo(dtype, tuple(shape), nbytes), begin, end


def _check_metadata(value: Any) -> None:
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise _fail(f"{METADATA_KEY} must map strings to strings")


def read_safetensors_header(
    path: Path, max_file_bytes: int, max_tensors: int = 100_000
) -> dict[str, TensorInfo]:
    """Validate the layout of a .safetensors file without loading any tensor data.

    Returns tensor name -> TensorInfo. Raises AdapterValidationError if anything is off.
    """
    path = Path(path)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # O_NONBLOCK: opening a fifo never hangs
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(fd)  # of the file actually opened, not of whatever the path names later
        if not stat.S_ISREG(info.st_mode):
            raise _fail("not a regular file")
        file_size = info.st_size
        if file_size > max_file_bytes:
            raise _fail(f"file is {file_size} bytes, over the limit of {max_file_bytes}")
        prefix = f.read(8)
        if len(prefix) < 8:
            raise _fail("file is shorter than the 8-byte header length")
        header_len = int.from_bytes(prefix, "little")
        if header_len > MAX_HEADER_BYTES:
            raise _fail(f"header length {header_len} is over the limit of {MAX_HEADER_BYTES} bytes")
        if 8 + header_len > file_size:
            raise _fail(f"header length {header_len} runs past the end of the {file_size}-byte file")
        raw = f.read(header_len)
    if len(raw) != header_len:  # the file shrank under us
        raise _fail("file is truncated inside its header")
    header = _parse_header(raw)

    if len(header) - (METADATA_KEY in header) > max_tensors:
        raise _fail(f"header lists more than {max_tensors} tensors")
    data_len = file_size - 8 - header_len
    tensors: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for index, (name, entry) in enumerate(header.items()):
        if name == METADATA_KEY:
            _check_metadata(entry)
            continue
        info, begin, end = _check_entry(name, index, entry, data_len)
        tensors[name] = info
        spans.append((begin, end, _label(name, index)))

    # Sorted by start, each tensor must begin exactly where the previous one ended: this
    # rules out overlap (shared bytes), gaps (hidden bytes) and trailing data in one pass.
    expected = 0
    for begin, end, label in sorted(spans):
        if begin < expected:
            raise _fail(f"{label} overlaps the tensor before it")
        if begin > expected:
            raise _fail(f"{begin - expected} unaccounted bytes before {label}")
        expected = end
    if expected != data_len:
        raise _fail(f"{data_len - expected} trailing bytes after the last tensor")
    logger.debug("safetensors header of %s checked: %d tensors, %d data bytes", path.name, len(tensors), data_len)
    return tensors


def load_checked_tensors(path: Path, max_file_bytes: int) -> dict[str, torch.Tensor]:
    """Check the header, then load every tensor onto the CPU."""
    import safetensors
    import safetensors.torch

    expected = read_safetensors_header(path, max_file_bytes)
    try:
        tensors = safetensors.torch.load_file(str(path), device="cpu")
    except (safetensors.SafetensorError, ValueError, RuntimeError, TypeError) as exc:
        raise _fail(f"safetensors refused the file ({type(exc).__name__})") from None
    if set(tensors) != set(expected):  # the file changed between check and load
        raise _fail("tensors loaded differ from the checked header")
    return tensors
