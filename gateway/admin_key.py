"""The admin key: from settings, or generated once and kept owner-readable in the data directory,
so admin routes are never open even when the operator configured nothing."""

from __future__ import annotations

import logging
import os
import secrets
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
    # O_EXCL on a temp name + rename: never a half-written or world-readable key file
    tmp = path.with_name(f".{ADMIN_KEY_FILE}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    log.warning("no admin key configured: generated one and stored it in %s (owner-only)", path.resolve())
    return key
