"""Test-only fault injection at the points where durable state is written (the chaos tests).

Off unless the environment variable ``GATEWAY_TEST_FAULTS_FILE`` names a file. Then every
``hit(point)`` reads that file — one ``<point> <action>`` per line — so a test can arm and disarm
faults while the server runs. ``<action>:<n>`` fires from the n-th hit of that point on (counted
in this process since it was armed). Actions:

- ``kill``: SIGKILL this process, a crash at exactly that point (no cleanup of any kind);
- ``enospc``: raise ``OSError(ENOSPC)``, as a full disk does to a file write;
- ``sqlite-full``: raise ``sqlite3.OperationalError("database or disk is full")``, as SQLite does.

Points: ``blob.write`` (between the two files of a new blob), ``shared-blob.write`` (after each file
of a blob uploaded to the shared store, before its completion marker), ``blob.remove``, ``adapter-db.delete``,
``checkpoint.write`` (between a checkpoint's tensors and its state), ``experiment-db.update``
(inside the transaction, before its commit). Unset, a hit costs one environment lookup.
"""

from __future__ import annotations

import errno
import os
import signal
import sqlite3

ENV = "GATEWAY_TEST_FAULTS_FILE"
_hits: dict[str, int] = {}


def hit(point: str) -> None:
    path = os.environ.get(ENV)
    if not path:
        return
    try:
        with open(path) as f:
            armed = dict(line.split(None, 1) for line in f.read().splitlines() if len(line.split()) == 2)
    except FileNotFoundError:  # disarmed
        _hits.clear()
        return
    action, _, nth = armed.get(point, "").strip().partition(":")
    if not action:
        _hits.pop(point, None)
        return
    _hits[point] = _hits.get(point, 0) + 1
    if _hits[point] < int(nth or 1):
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "enospc":
        raise OSError(errno.ENOSPC, f"No space left on device (injected at {point})")
    elif action == "sqlite-full":
        raise sqlite3.OperationalError(f"database or disk is full (injected at {point})")
