"""Safe extraction of an uploaded adapter archive (.zip, .tar or .tar.gz).

Everything uploaded is hostile until proven otherwise. Every member header is validated before a
single byte is written, and the only paths ever written are ``dest_dir/<one of ALLOWED_NAMES>``:
an output path is chosen from that constant set, never built from a member name, so traversal
tricks cannot reach the filesystem even if a name check were missed. Sizes are enforced twice:
once on what the headers declare and again while streaming, because a declared size may lie.
"""

from __future__ import annotations

import gzip
import logging
import os
import re
import stat
import struct
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Union

from adapters.errors import AdapterValidationError
from adapters.validate import MAX_CONFIG_BYTES

logger = logging.getLogger(__name__)

MiB = 1024 * 1024
GiB = 1024 * MiB
WEIGHTS_NAME = "adapter_model.safetensors"  # the one member allowed up to max_member_bytes
ALLOWED_NAMES = frozenset({"adapter_config.json", WEIGHTS_NAME})
IGNORED_NAMES = frozenset({"README.md"})  # tolerated in an upload, never extracted
# Formats that unpickle on load: loading one runs arbitrary code, so they are refused outright.
PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"})
_CHUNK = MiB
# A tar stream holds headers, pax records and padding besides member data; this allowance bounds
# how much decompressed stream we accept beyond max_total_bytes before calling it a bomb.
_TAR_BASE_OVERHEAD = MiB
_TAR_PER_MEMBER_OVERHEAD = 64 * 1024
_DRIVE = re.compile(r"^[A-Za-z]:")
# zipfile reads the whole central directory (its size comes from the end record) and builds one
# ZipInfo per entry before we see any; both the entry count and this size are checked first. A
# real entry is 46 bytes plus a short name and a few small extra fields.
_ZIP_DIR_BYTES_PER_MEMBER = 4096
_EOCD = struct.Struct("<4s4H2LH")  # end of central directory: sig, disks, counts, size, offset, comment
_EOCD64_LOCATOR = struct.Struct("<4sLQL")
_EOCD64 = struct.Struct("<4sQ2H2L4Q")  # ... entries on this disk, entries, directory size, offset
_ZIP_COMMENT_MAX = 0xFFFF

Member = Union[zipfile.ZipInfo, tarfile.TarInfo]
Archive = Union[zipfile.ZipFile, tarfile.TarFile]
# What a malformed archive can raise while being read (gzip.BadGzipFile is an OSError).
_READ_ERRORS = (zipfile.BadZipFile, tarfile.TarError, zlib.error, EOFError, OSError, ValueError,
                NotImplementedError, RuntimeError)


@dataclass(frozen=True)
class ArchiveLimits:
    max_members: int = 16
    max_member_bytes: int = 512 * MiB  # the weights file
    max_total_bytes: int = 1 * GiB
    # Every other extracted member (the config) is read later under this limit and refused past it,
    # so inflating and writing up to max_member_bytes of it first would only waste disk and CPU.
    max_config_bytes: int = MAX_CONFIG_BYTES

    def member_limit(self, out_name: str) -> int:
        """The most bytes the member extracted as ``out_name`` may hold."""
        return self.max_member_bytes if out_name == WEIGHTS_NAME else self.max_config_bytes


@dataclass(frozen=True)
class _Entry:  # one archive member, reduced to what validation needs
    raw_name: str
    parts: tuple[str, ...]  # path components with "" and "." dropped
    is_dir: bool
    size: int  # declared (uncompressed) size
    member: Member


def _show(name: str) -> str:  # a member name made safe for messages and logs
    return ascii(name[:120])


_fail = AdapterValidationError


def _split_name(raw: str) -> tuple[str, ...]:
    if not raw:
        raise _fail("archive member with an empty name")
    if "\x00" in raw:
        raise _fail(f"archive member name contains a NUL byte: {_show(raw)}")
    if "\\" in raw:
        raise _fail(f"archive member name contains a backslash: {_show(raw)}")
    if raw.startswith("/") or _DRIVE.match(raw):
        raise _fail(f"archive member has an absolute path: {_show(raw)}")
    parts = tuple(p for p in raw.split("/") if p not in ("", "."))
    if ".." in parts:
        raise _fail(f"archive member path contains '..': {_show(raw)}")
    return parts


def _zip_entry(info: zipfile.ZipInfo) -> _Entry:
    _split_name(info.orig_filename)  # zipfile truncates .filename at a NUL; the original keeps it
    parts, name = _split_name(info.filename), _show(info.filename)
    if info.flag_bits & 0x1:
        raise _fail(f"archive member {name} is encrypted; upload an unencrypted archive")
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise _fail(f"archive member {name} uses an unsupported compression method")
    mode = info.external_attr >> 16  # unix st_mode, when the creator recorded one
    if stat.S_ISLNK(mode):
        raise _fail(f"archive member {name} is a symlink; links are not allowed")
    if stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):
        raise _fail(f"archive member {name} is not a regular file or folder")
    return _Entry(info.filename, parts, info.is_dir(), info.file_size, info)


_TAR_REFUSED_TYPES = {
    tarfile.SYMTYPE: "is a symlink; links are not allowed",
    tarfile.LNKTYPE: "is a hardlink; links are not allowed",
    tarfile.CHRTYPE: "is a device file",
    tarfile.BLKTYPE: "is a device file",
    tarfile.FIFOTYPE: "is a fifo",
}


def _tar_entry(info: tarfile.TarInfo) -> _Entry:
    parts, name = _split_name(info.name), _show(info.name)
    if info.type in _TAR_REFUSED_TYPES:
        raise _fail(f"archive member {name} {_TAR_REFUSED_TYPES[info.type]}")
    if info.issparse() or not (info.isreg() or info.isdir()):
        raise _fail(f"archive member {name} is not a regular file or folder")
    return _Entry(info.name, parts, info.isdir(), info.size, info)


def _plan(entries: list[_Entry], limits: ArchiveLimits) -> dict[str, _Entry]:
    """Validate the archive as a whole; return the members to extract, keyed by output name."""
    if len(entries) > limits.max_members:
        raise _fail(f"archive has more than {limits.max_members} members")
    total = 0
    for e in entries:
        if e.size > limits.max_member_bytes:
            raise _fail(f"archive member {_show(e.raw_name)} declares {e.size} bytes, "
                        f"over the per-member limit of {limits.max_member_bytes}")
        total += e.size
        if total > limits.max_total_bytes:
            raise _fail(f"archive declares more than the total limit of {limits.max_total_bytes} bytes")
    files = [e for e in entries if not e.is_dir and e.parts]
    for e in entries:
        if len(e.parts) > (1 if e.is_dir else 2):
            raise _fail(f"archive member {_show(e.raw_name)} is nested deeper than one folder")
    folders = {e.parts[0] for e in entries if len(e.parts) == 2 or (e.is_dir and e.parts)}
    if len(folders) > 1:
        shown = ", ".join(sorted(_show(f) for f in folders))
        raise _fail(f"archive has more than one top-level folder: {shown}")
    if folders and any(len(e.parts) == 1 for e in files):
        raise _fail("archive mixes files at its root with files inside a folder")
    chosen: dict[str, _Entry] = {}
    for e in files:
        base = e.parts[-1]
        if PurePosixPath(base).suffix.lower() in PICKLE_SUFFIXES:
            raise _fail(f"archive member {_show(e.raw_name)} is a pickle-based weight file; pickles "
                        "are never loaded, upload adapter_model.safetensors instead")
        if base in IGNORED_NAMES:
            continue
        if base not in ALLOWED_NAMES:
            raise _fail(f"archive member {_show(e.raw_name)} is not an expected adapter file "
                        f"(allowed: {', '.join(sorted(ALLOWED_NAMES))})")
        if base in chosen:
            raise _fail(f"archive holds {base} more than once")
        if e.size > limits.member_limit(base):
            raise _fail(f"archive member {_show(e.raw_name)} declares {e.size} bytes, over the {base} "
                        f"limit of {limits.member_limit(base)} bytes")
        chosen[base] = e
    missing = sorted(ALLOWED_NAMES - chosen.keys())
    if missing:
        raise _fail(f"archive is missing {', '.join(missing)}")
    return chosen


def _read(src: IO[bytes], name: str, size: int = _CHUNK) -> bytes:
    try:
        return src.read(size)
    except _READ_ERRORS as exc:  # e.g. a CRC mismatch once a lying member is fully inflated
        raise _fail(f"archive member {name} is corrupt: {type(exc).__name__}") from None


class _Budget:
    """Counts bytes actually decompressed, across members, against the limits."""

    def __init__(self, limits: ArchiveLimits):
        self.limits, self.total = limits, 0

    def copy(self, src: IO[bytes], entry: _Entry, dest: Path, written: list[Path]) -> None:
        name, limits = _show(entry.raw_name), self.limits
        limit = limits.member_limit(dest.name)  # dest is dest_dir/<one of ALLOWED_NAMES>
        # O_EXCL + O_NOFOLLOW: never follow or overwrite anything already at the path.
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        written.append(dest)  # recorded only once created by us, so cleanup never removes others
        count = 0
        with os.fdopen(fd, "wb") as out:
            os.fchmod(fd, 0o600)  # the umask may only narrow 0o600; make the mode exact anyway
            # never inflate more than one byte past the limit: a config's limit is far below _CHUNK
            while chunk := _read(src, name, min(_CHUNK, limit - count + 1)):
                count += len(chunk)
                self.total += len(chunk)
                if count > limit:  # checked before the write: nothing past the limit reaches disk
                    raise _fail(f"archive member {name} expands past the {dest.name} limit of {limit} bytes")
                if self.total > limits.max_total_bytes:
                    raise _fail(f"archive expands past the total limit of {limits.max_total_bytes} bytes")
                if count > entry.size:
                    raise _fail(f"archive member {name} holds more data than its header declares")
                out.write(chunk)
        if count != entry.size:
            raise _fail(f"archive member {name} holds {count} bytes but declares {entry.size}")


_TAR_BLOCK = 512
_TAR_META_TYPES = frozenset(b"xgLKX")  # pax (per-file, global, Solaris) and GNU long name / link
_TAR_META_MAX = 64 * 1024  # tarfile reads a metadata entry into memory whole: keep that small


class _CountingReader:
    """Reads a stream for the header walk, counting every byte against the decompression cap."""

    def __init__(self, stream: IO[bytes], cap: int):
        self.stream, self.cap, self.total = stream, cap, 0

    def read(self, size: int) -> bytes:
        data = self.stream.read(size)
        self.total += len(data)
        if self.total > self.cap:
            raise _fail(f"archive expands past the limit of {self.cap} bytes")
        return data

    def skip(self, size: int) -> None:
        while size > 0:
            chunk = self.read(min(size, _CHUNK))
            if not chunk:
                return  # truncated: tarfile reports it
            size -= len(chunk)


def _tar_number(field: bytes) -> int:
    """A numeric header field as tarfile reads it: octal text, or base-256 when the top bit is set."""
    if field[:1] in (b"\x80", b"\xff"):
        value = int.from_bytes(field[1:], "big")
        return -value if field[:1] == b"\xff" else value  # negative: refused by the caller
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise _fail("upload is a corrupt tar archive (a header has a malformed size)") from None


def _pax_size(records: bytes) -> int | None:
    """The ``size`` a pax header sets for the next member (it overrides that member's header field)."""
    size, pos = None, 0
    while pos < len(records) and records[pos:pos + 1] != b"\0":
        length_text, _, _ = records[pos:pos + 20].partition(b" ")
        if not length_text.isdigit() or int(length_text) <= len(length_text):
            raise _fail("upload is a corrupt tar archive (a malformed pax header)")
        record = records[pos:pos + int(length_text)]
        key, _, value = record[len(length_text) + 1:].rstrip(b"\n").partition(b"=")
        if key == b"size":
            size = int(value) if value.isdigit() and len(value) <= 20 else -1
        pos += int(length_text)
    return size


def _walk_tar_headers(reader: _CountingReader, limits: ArchiveLimits) -> None:
    """Follow the headers as tarfile will, before it reads any: at most max_members members, and
    no metadata entry (which tarfile would read whole into memory) over _TAR_META_MAX bytes."""
    members = 0
    next_size: int | None = None
    while len(block := reader.read(_TAR_BLOCK)) == _TAR_BLOCK and block != bytes(_TAR_BLOCK):
        kind, size = block[156], _tar_number(block[124:136])
        if kind in _TAR_META_TYPES:
            if not 0 <= size <= _TAR_META_MAX:
                raise _fail(f"archive has a metadata entry of {size} bytes; the limit is {_TAR_META_MAX}")
            data = reader.read(-(-size // _TAR_BLOCK) * _TAR_BLOCK)
            if kind == ord("x"):
                next_size = _pax_size(data[:size])
            continue
        members += 1
        if members > limits.max_members:
            raise _fail(f"archive has more than {limits.max_members} members")
        size = size if next_size is None else next_size
        next_size = None
        if size < 0:
            raise _fail("upload is a corrupt tar archive (a negative member size)")
        reader.skip(-(-size // _TAR_BLOCK) * _TAR_BLOCK)


def _check_tar_stream(path: Path, kind: str, limits: ArchiveLimits) -> None:
    """Bound the decompressed tar stream (a gzip bomb stops here) and walk its headers before
    tarfile does (too many members or a huge metadata entry stop here)."""
    cap = limits.max_total_bytes + _TAR_BASE_OVERHEAD + limits.max_members * _TAR_PER_MEMBER_OVERHEAD
    if kind == "tar" and path.stat().st_size > cap:
        raise _fail(f"archive expands past the limit of {cap} bytes")
    try:
        with (gzip.open(path, "rb") if kind == "tar.gz" else path.open("rb")) as stream:
            if stream.read(_TAR_BLOCK)[257:262] != b"ustar":
                raise _fail("gzip upload does not hold a tar archive")
            stream.seek(0)  # a gzip stream rewinds by decompressing again: 512 bytes here
            reader = _CountingReader(stream, cap)
            _walk_tar_headers(reader, limits)
            while kind == "tar.gz" and reader.read(_CHUNK):  # the rest of the stream counts too
                pass
    except _READ_ERRORS:
        raise _fail(f"upload is a corrupt or truncated {'gzip' if kind == 'tar.gz' else 'tar'} file") from None


def _zip_directory_extent(f: IO[bytes]) -> tuple[int, int]:
    """(entries, central directory bytes) as the end record declares them, found the way zipfile
    finds it (a record at the very end, else the last signature in the comment-sized tail), and
    with the ZIP64 record zipfile would use in its place when one precedes it."""
    size = f.seek(0, os.SEEK_END)
    if size < _EOCD.size:
        raise _fail("upload is a corrupt zip archive (too short)")
    f.seek(size - _EOCD.size)
    tail = f.read(_EOCD.size)
    if not (tail[:4] == b"PK\x05\x06" and tail[-2:] == b"\x00\x00"):
        start = max(size - _ZIP_COMMENT_MAX - _EOCD.size, 0)
        f.seek(start)
        window = f.read()
        at = window.rfind(b"PK\x05\x06")
        tail = window[at:at + _EOCD.size] if at >= 0 else b""
        if len(tail) != _EOCD.size:
            raise _fail("upload is a corrupt zip archive (no end of central directory record)")
        end_at = start + at
    else:
        end_at = size - _EOCD.size
    _, disk, dir_disk, disk_entries, entries, dir_size, _, _ = _EOCD.unpack(tail)
    entries = max(entries, disk_entries)
    if disk or dir_disk:
        raise _fail("multi-part (spanned) zip archives are not supported")
    if end_at >= _EOCD64_LOCATOR.size + _EOCD64.size:
        f.seek(end_at - _EOCD64_LOCATOR.size)
        if f.read(4) == b"PK\x06\x07":  # ZIP64: zipfile reads the record just before the locator
            f.seek(end_at - _EOCD64_LOCATOR.size - _EOCD64.size)
            record = f.read(_EOCD64.size)
            if record[:4] == b"PK\x06\x06":
                fields = _EOCD64.unpack(record)
                entries, dir_size = max(fields[6], fields[7]), fields[8]  # replaces the end record's
    return entries, dir_size


def _check_zip_directory(path: Path, limits: ArchiveLimits) -> None:
    with path.open("rb") as f:
        entries, dir_size = _zip_directory_extent(f)
    if entries > limits.max_members:
        raise _fail(f"archive has more than {limits.max_members} members")
    if dir_size > limits.max_members * _ZIP_DIR_BYTES_PER_MEMBER:
        raise _fail(f"archive's central directory is {dir_size} bytes, more than {limits.max_members} "
                    "adapter files need")


def _open(path: Path, limits: ArchiveLimits) -> tuple[str, Archive]:
    with path.open("rb") as f:  # the format comes from magic bytes, never from the file name
        head = f.read(512)
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        kind = "zip"
        _check_zip_directory(path, limits)  # before zipfile parses the directory
    elif head[:2] == b"\x1f\x8b" or head[257:262] == b"ustar":
        kind = "tar.gz" if head[:2] == b"\x1f\x8b" else "tar"
        _check_tar_stream(path, kind, limits)
    else:
        raise _fail("upload is not a zip, tar or tar.gz archive")
    try:
        if kind == "zip":
            return kind, zipfile.ZipFile(path)
        return kind, tarfile.open(path, mode="r:gz" if kind == "tar.gz" else "r:")
    except _READ_ERRORS:
        raise _fail(f"upload is a corrupt {kind} archive") from None


def _entries(archive: Archive, limits: ArchiveLimits) -> list[_Entry]:
    if isinstance(archive, zipfile.ZipFile):  # _plan checks the member count
        return [_zip_entry(i) for i in archive.infolist()]
    entries: list[_Entry] = []
    try:
        while (info := archive.next()) is not None:
            if len(entries) >= limits.max_members:  # stop reading headers as soon as we know
                raise _fail(f"archive has more than {limits.max_members} members")
            entries.append(_tar_entry(info))
    except _READ_ERRORS:
        raise _fail("upload is a corrupt tar archive") from None
    return entries


def _open_member(archive: Archive, entry: _Entry) -> IO[bytes]:
    try:
        if isinstance(archive, zipfile.ZipFile):
            return archive.open(entry.member)  # type: ignore[arg-type]
        src = archive.extractfile(entry.member)  # type: ignore[arg-type]
    except _READ_ERRORS:
        src = None
    if src is None:
        raise _fail(f"archive member {_show(entry.raw_name)} cannot be read")
    return src


def extract_adapter_archive(archive_path: Path, dest_dir: Path, limits: ArchiveLimits) -> None:
    """Extract the adapter files of an uploaded archive into ``dest_dir``.

    ``dest_dir`` must exist and be empty (a ValueError otherwise: that is the caller's bug, not the
    upload's). Raises AdapterValidationError for anything unsafe or malformed, after removing every
    file this call wrote; ``dest_dir`` itself is left in place.
    """
    archive_path, dest_dir = Path(archive_path), Path(dest_dir)
    if not dest_dir.is_dir() or any(dest_dir.iterdir()):
        raise ValueError(f"extraction folder must exist and be empty: {dest_dir}")
    written: list[Path] = []
    try:
        kind, archive = _open(archive_path, limits)
        with archive:
            plan = _plan(_entries(archive, limits), limits)  # every header checked before any write
            budget = _Budget(limits)
            for out_name, entry in plan.items():
                with _open_member(archive, entry) as src:
                    budget.copy(src, entry, dest_dir / out_name, written)
    except BaseException as exc:
        for target in written:  # only files this call created (O_EXCL)
            target.unlink(missing_ok=True)
        if isinstance(exc, AdapterValidationError):
            logger.warning("refused adapter archive %s: %s", archive_path.name, exc)
        raise
    logger.info("extracted adapter archive %s (%s) into %s", archive_path.name, kind, dest_dir)
