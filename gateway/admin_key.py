"""The admin key: from settings, or generated once and kept owner-readable in the data directory,
so admin routes are never open even when the operator configured nothing."""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)
ADMIN_KEY_FILE = "admin_key"


def resolve_admin_key(configured: str | None, data_dir: Path) -> str:
    if configured:
        return configured
    path = data_dir / ADMIN_KEY_FILE
    if path.exists():
        if path.stat().st_mode & 0o077:
            os.chmod(path, 0o600)  # someone loosened it; the key is a secret
            log.warning("tightened permissions of %s to owner-only", path)
        key = path.read_text().strip()
        if key:
            log.info("admin key read from %s", path)
            return key
    data_dir.mkdir(parents=True, exist_ok=True)
    key = "gwadm-" + secrets.token_urlsafe(32)
    _write_private(path, key + "\n")
    log.warning("no admin key configured: generated one and stored it in %s (owner-only)", path.resolve())
    return key


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically, owner-only from its first byte.

    The temp file gets a unique random name (mkstemp: O_EXCL, mode 0600), so a leftover from a
    crashed or failed start never blocks a later one, and it is removed when anything fails
    before the rename; a leftover from a killed process is only an inert hidden file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
