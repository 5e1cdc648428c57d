"""gateway.uploads.stage_source_folder: a server-side folder is read through one opened file per
adapter file, so nothing swapped in after a check (a link, /dev/zero, a fifo, a bigger file) is read."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

import gateway.uploads as uploads
from adapters.errors import AdapterValidationError
from adapters.peft_io import CONFIG_FILE, WEIGHTS_FILE
from gateway.uploads import stage_source_folder

LIMIT = 4096
CONFIG = b'{"peft_type": "LORA"}'
WEIGHTS = b"w" * 1000


@pytest.fixture
def root(tmp_path: Path) -> Path:
    folder = tmp_path / "roots" / "adapter"
    folder.mkdir(parents=True)
    (folder / CONFIG_FILE).write_bytes(CONFIG)
    (folder / WEIGHTS_FILE).write_bytes(WEIGHTS)
    (tmp_path / "staging").mkdir()
    return tmp_path / "roots"


def stage(root: Path, tmp_path: Path) -> Path:
    staging = tmp_path / "staging" / os.urandom(4).hex()
    staging.mkdir()
    return stage_source_folder("adapter", [root], staging, LIMIT)


def test_a_plain_folder_is_copied(root, tmp_path):
    out = stage(root, tmp_path)
    assert (out / CONFIG_FILE).read_bytes() == CONFIG and (out / WEIGHTS_FILE).read_bytes() == WEIGHTS


@pytest.mark.parametrize("replace,words", [
    (lambda p: (p.unlink(), os.mkfifo(p)), "not a regular file"),  # opening it must not hang either
    (lambda p: (p.unlink(), p.symlink_to("/dev/zero")), "is a link"),
    (lambda p: (p.unlink(), p.symlink_to(p.with_name(CONFIG_FILE))), "is a link"),  # even inside the root
    (lambda p: p.write_bytes(b"x" * (LIMIT + 1)), "larger than the limit"),
    (lambda p: (p.unlink(), p.mkdir()), "not a regular file"),
    (lambda p: p.unlink(), "missing"),
])
def test_what_is_not_a_small_regular_file_is_refused(root, tmp_path, replace, words):
    replace(root / "adapter" / WEIGHTS_FILE)
    with pytest.raises(AdapterValidationError, match=words):
        stage(root, tmp_path)


def test_a_folder_swapped_for_a_link_after_the_check_is_refused(root, tmp_path, monkeypatch):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / CONFIG_FILE).write_bytes(CONFIG)
    (outside / WEIGHTS_FILE).write_bytes(b"secret")
    real_resolve = uploads.resolve_source_folder

    def resolve_then_swap(raw, roots):
        found = real_resolve(raw, roots)
        os.rename(root / "adapter", tmp_path / "moved")
        (root / "adapter").symlink_to(outside, target_is_directory=True)
        return found

    monkeypatch.setattr(uploads, "resolve_source_folder", resolve_then_swap)
    with pytest.raises(AdapterValidationError, match="not a folder inside"):
        stage(root, tmp_path)


def test_a_file_that_grows_after_the_size_check_is_cut_off(root, tmp_path, monkeypatch):
    real_fstat = os.fstat

    def fstat_then_grow(fd):  # the attacker appends right after the size was read
        info = real_fstat(fd)
        with open(root / "adapter" / WEIGHTS_FILE, "ab") as f:
            f.write(b"x" * (LIMIT * 4))
        return info

    monkeypatch.setattr(uploads.os, "fstat", fstat_then_grow)
    with pytest.raises(AdapterValidationError, match="larger than the limit"):
        stage(root, tmp_path)


def test_swaps_racing_the_copy_never_get_through(root, tmp_path):
    """A thread keeps swapping the weights for a fifo, a link to /dev/zero and an oversized file.
    Every registration either copies the real weights or is refused; nothing else escapes."""
    folder = root / "adapter"
    spare = tmp_path / "spares"
    spare.mkdir()
    (spare / "good").write_bytes(WEIGHTS)
    (spare / "big").write_bytes(b"x" * (LIMIT * 8))
    os.mkfifo(spare / "fifo")
    (spare / "zero").symlink_to("/dev/zero")
    stop = threading.Event()

    def swapper():
        names = ["fifo", "good", "zero", "good", "big", "good"]
        i = 0
        while not stop.is_set():
            name = names[i % len(names)]
            i += 1
            tmp = folder / ".swap"
            if name in ("fifo", "zero"):
                tmp.unlink(missing_ok=True)
                os.mkfifo(tmp) if name == "fifo" else tmp.symlink_to("/dev/zero")
            else:
                tmp.write_bytes((spare / name).read_bytes())
            os.replace(tmp, folder / WEIGHTS_FILE)  # atomic, as an attacker would do it

    thread = threading.Thread(target=swapper, daemon=True)
    thread.start()
    outcomes = {"copied": 0, "refused": 0}
    try:
        for _ in range(300):
            try:
                out = stage(root, tmp_path)
            except AdapterValidationError:
                outcomes["refused"] += 1
            else:
                assert (out / WEIGHTS_FILE).read_bytes() == WEIGHTS
                outcomes["copied"] += 1
    finally:
        stop.set()
        thread.join()
    assert sum(outcomes.values()) == 300
