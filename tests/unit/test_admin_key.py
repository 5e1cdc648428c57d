"""The generated admin key file: a failed or crashed write never blocks a later start."""

from __future__ import annotations

import os
import stat

import pytest

from gateway.admin_key import ADMIN_KEY_FILE, resolve_admin_key


def test_a_leftover_temp_file_of_this_pid_does_not_block(tmp_path):
    # what a start that died between creating and renaming its temp file left behind
    (tmp_path / f".{ADMIN_KEY_FILE}.{os.getpid()}.tmp").write_text("half")
    key = resolve_admin_key(None, tmp_path)
    assert key.startswith("gwadm-")
    assert (tmp_path / ADMIN_KEY_FILE).read_text().strip() == key
    assert stat.S_IMODE((tmp_path / ADMIN_KEY_FILE).stat().st_mode) == 0o600


def test_a_failed_write_leaves_nothing_and_the_next_start_works(tmp_path, monkeypatch):
    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError):
        resolve_admin_key(None, tmp_path)
    assert list(tmp_path.iterdir()) == []  # no temp file, no half-written key
    monkeypatch.undo()
    key = resolve_admin_key(None, tmp_path)
    assert resolve_admin_key(None, tmp_path) == key  # kept and read back
    assert [p.name for p in tmp_path.iterdir()] == [ADMIN_KEY_FILE]


def test_a_configured_key_wins(tmp_path):
    assert resolve_admin_key("configured-admin-key-123", tmp_path) == "configured-admin-key-123"
    assert not (tmp_path / ADMIN_KEY_FILE).exists()
