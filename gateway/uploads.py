"""Turn what an operator sends (uploaded files, one archive, or a server-side folder under an
allowed root) into a private staging folder holding at most the two PEFT adapter files.

Nothing here trusts a client-chosen name or path: uploaded files are written under fixed names
chosen from ``BLOB_FILES``, archives go through ``extract_adapter_archive``, and a server-side
folder must resolve (symlinks followed) inside an allowed root, and each file is read from the opened
folder without following links, checked and copied through one open file (no check-then-copy race).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import stat
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath, PureWindowsPath

from starlette.datastructures import UploadFile

from adapters.archive import IGNORED_NAMES, PICKLE_SUFFIXES, ArchiveLimits, extract_adapter_archive
from adapters.blobs import BLOB_FILES
from adapters.errors import AdapterValidationError
from adapters.peft_io import CONFIG_FILE, WEIGHTS_FILE
from adapters.validate import MAX_CONFIG_BYTES
from gateway.errors import PayloadTooLargeError

log = logging.getLogger(__name__)
ARCHIVE_SUFFIXES = (".zip", ".tar.gz", ".tgz", ".tar")
_CHUNK = 1 << 20


@contextmanager
def staging_folder(root: Path) -> Iterator[Path]:
    """A fresh empty folder under ``root``, removed afterwards whatever happens."""
    folder = root / uuid.uuid4().hex
    folder.mkdir(parents=True)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def clear_staging(root: Path) -> None:
    """Remove what a crashed upload left behind (called at start, before serving)."""
    if root.is_dir():
        for child in root.iterdir():
            log.warning("removing leftover upload %s", child)
            shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)


def _client_basename(filename: str | None) -> str:
    # the client's name only selects a role; it is never used as a path
    name = filename or ""
    return PureWindowsPath(PurePosixPath(name).name).name


async def _save(upload: UploadFile, dest: Path, max_bytes: int, what: str) -> None:
    written = 0
    with open(dest, "xb") as out:
        while chunk := await upload.read(_CHUNK):
            written += len(chunk)
            if written > max_bytes:  # a part of the request body: the one 413 path
                raise PayloadTooLargeError.over(max_bytes, what, param="files")
            out.write(chunk)


async def stage_uploads(uploads: list[UploadFile], staging: Path, max_adapter_bytes: int,
                        archive_limits: ArchiveLimits) -> Path:
    """Write the uploaded adapter files (or extract one archive) into ``staging``; returns the folder
    holding ``adapter_config.json`` and ``adapter_model.safetensors``."""
    pairs = [(u, _client_basename(u.filename)) for u in uploads]
    pairs = [(u, n) for u, n in pairs if n not in IGNORED_NAMES]  # a model card may come along
    uploads, names = [u for u, _ in pairs], [n for _, n in pairs]
    for name in names:
        if any(name.lower().endswith(s) for s in PICKLE_SUFFIXES):
            raise AdapterValidationError(
                f"{name} is a pickle file, which is never loaded (it can run code); send {WEIGHTS_FILE} instead")
    if not uploads:
        raise AdapterValidationError(
            f"no files uploaded: send {CONFIG_FILE} and {WEIGHTS_FILE}, or one .zip / .tar.gz holding them")
    archives = [n for n in names if n.lower().endswith(ARCHIVE_SUFFIXES)]
    adapter_dir = staging / "adapter"
    adapter_dir.mkdir()
    if archives:
        if len(uploads) != 1:
            raise AdapterValidationError("send either one archive or the adapter files, not both")
        archive_path = staging / "upload"
        await _save(uploads[0], archive_path, archive_limits.max_total_bytes, "the archive")
        # inflating up to the size limits takes seconds: never on the event loop
        await asyncio.to_thread(extract_adapter_archive, archive_path, adapter_dir, archive_limits)
        return adapter_dir
    for upload, name in zip(uploads, names, strict=True):
        if name not in BLOB_FILES:
            raise AdapterValidationError(
                f"unexpected file {name[:80]!r}: send {CONFIG_FILE} and {WEIGHTS_FILE}, or one archive")
        if (adapter_dir / name).exists():
            raise AdapterValidationError(f"{name} was uploaded twice")
        limit = MAX_CONFIG_BYTES if name == CONFIG_FILE else max_adapter_bytes
        await _save(upload, adapter_dir / name, limit, name)
    return adapter_dir


def _inside(path: Path, root: Path) -> bool:
    return path == root or path.is_relative_to(root)


def resolve_source_folder(raw: str, roots: list[Path]) -> tuple[Path, Path]:
    """The real folder a server-side ``source_path`` names, and the allowed root it lies in."""
    if not roots:
        raise AdapterValidationError(
            "registering from a server-side folder is disabled; the operator allows it with "
            "GATEWAY_ADAPTER_SOURCE_ROOTS")
    if not raw or "\0" in raw or len(raw) > 4096:
        raise AdapterValidationError("source_path is empty or invalid")
    given = Path(raw)
    if ".." in given.parts:
        raise AdapterValidationError("source_path must not contain '..'")
    real_roots = [r.resolve() for r in roots]
    candidates = [given] if given.is_absolute() else [root / given for root in real_roots]
    for candidate in candidates:
        real = Path(os.path.realpath(candidate))
        root = next((r for r in real_roots if _inside(real, r)), None)
        if root is not None and real.is_dir():
            return real, root
    # one message for "outside", "missing" and "symlinked out": do not reveal what exists where
    raise AdapterValidationError("source_path is not a folder inside the allowed adapter source roots")


def _open_dir_inside(folder: Path, root: Path) -> int:
    """An fd on ``folder``, checked to be inside ``root`` by what was actually opened: a folder
    swapped for a link after ``resolve_source_folder`` looked at it is caught here."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        proc = Path(f"/proc/self/fd/{fd}")
        opened = Path(os.readlink(proc)) if proc.is_symlink() else None  # Linux names the opened folder
        same = opened is not None or os.path.samestat(os.fstat(fd), os.stat(folder))  # elsewhere: best effort
        if not same or not _inside(opened or folder, root):
            raise AdapterValidationError("source_path is not a folder inside the allowed adapter source roots")
        return fd
    except BaseException:
        os.close(fd)
        raise


def _copy_source_file(dir_fd: int, name: str, dest: Path, limit: int) -> None:
    """Copy ``name`` from the opened folder: opened once, the check made on that open file, the copy
    bounded while reading, so nothing swapped in after a check (a link, /dev/zero, a fifo, a
    growing file) is ever read."""
    try:
        # O_NOFOLLOW: a link in the file's place is refused; O_NONBLOCK: opening a fifo never hangs
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd)
    except FileNotFoundError:
        raise AdapterValidationError(f"{name} is missing in source_path") from None
    except OSError:  # ELOOP: a link
        raise AdapterValidationError(
            f"{name} in source_path is a link (files are never read through links) or cannot be opened") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise AdapterValidationError(f"{name} in source_path is not a regular file")
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb") as src:
        if info.st_size > limit:
            raise AdapterValidationError(f"{name} is larger than the limit of {limit} bytes")
        copied = 0
        with open(dest, "xb") as out:
            while chunk := src.read(min(_CHUNK, limit + 1 - copied)):
                copied += len(chunk)
                if copied > limit:  # it grew after the fstat
                    raise AdapterValidationError(f"{name} is larger than the limit of {limit} bytes")
                out.write(chunk)


def stage_source_folder(raw: str, roots: list[Path], staging: Path, max_adapter_bytes: int) -> Path:
    """Copy the adapter files of an allowed server-side folder into ``staging``."""
    folder, root = resolve_source_folder(raw, roots)
    adapter_dir = staging / "adapter"
    adapter_dir.mkdir()
    dir_fd = _open_dir_inside(folder, root)
    try:
        names = os.listdir(dir_fd)
        pickles = [n for n in names if PurePosixPath(n).suffix.lower() in PICKLE_SUFFIXES]
        if WEIGHTS_FILE not in names and pickles:
            raise AdapterValidationError(
                f"{pickles[0]} is a pickle file, which is never loaded (it can run code); provide {WEIGHTS_FILE}")
        for name in BLOB_FILES:
            limit = MAX_CONFIG_BYTES if name == CONFIG_FILE else max_adapter_bytes
            _copy_source_file(dir_fd, name, adapter_dir / name, limit)
    finally:
        os.close(dir_fd)
    return adapter_dir
