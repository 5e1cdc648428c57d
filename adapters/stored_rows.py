"""Reading stored rows one by one: a row this release cannot read fails alone.

A row may not read when it was edited by hand, or written by a newer release (during a rolling
upgrade, or after a rollback). One such row must neither stop the gateway from starting nor stop
a replica from following the others' changes: it is left out of what is served, logged once with
what to do about it, and never rewritten or deleted here (the operator decides). Fields a newer
release added to a record are dropped on reading (``known_fields``), so its rows still read.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

log = logging.getLogger(__name__)
Parsed = TypeVar("Parsed")


class RowReader:
    """Parses one table's rows, whose first column is the row's id. ``unreadable``: the ids that
    did not read at the last full read (and at single reads since), which a store passes over; each
    is logged once while it stays unreadable."""

    def __init__(self, table: str, remedy: str):
        self.table = table
        self.remedy = remedy  # what the operator can do, in the log line
        self.unreadable: set[str] = set()

    def parse(self, row: Sequence[Any], parse: Callable[[Sequence[Any]], Parsed]) -> Parsed | None:
        row_id = str(row[0])
        try:
            parsed = parse(row)
        except Exception as exc:  # noqa: BLE001 - whatever is wrong with it, the row fails alone
            if row_id not in self.unreadable:
                self.unreadable.add(row_id)
                log.error("%s row %r does not read (%s: %s); it is left out, unchanged. %s", self.table, row_id,
                          type(exc).__name__, str(exc)[:200], self.remedy)
            return None
        self.unreadable.discard(row_id)  # repaired (or written again) since
        return parsed

    def parse_all(self, rows: Iterable[Sequence[Any]], parse: Callable[[Sequence[Any]], Parsed]) -> list[Parsed]:
        """Every row that reads, in order; a row gone from the table leaves ``unreadable`` too."""
        rows = list(rows)
        self.unreadable &= {str(row[0]) for row in rows}
        return [parsed for row in rows if (parsed := self.parse(row, parse)) is not None]


def known_fields(cls: type, data: Any) -> dict[str, Any]:
    """The keys of ``data`` (a stored JSON object) that the dataclass ``cls`` has; a newer release's
    additions are dropped. Raises ``TypeError`` when ``data`` is not an object."""
    if not isinstance(data, dict):
        raise TypeError(f"expected a JSON object, found {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    return {key: value for key, value in data.items() if key in names}
