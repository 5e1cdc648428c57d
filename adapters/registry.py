"""Adapter ids, device slots and in-flight counts.

Every registered adapter's weights stay in CPU memory; at most ``max_device_slots`` are copied
into runtime slots at a time. ``acquire`` puts an adapter on the device if needed, evicting the
least recently used adapter with no request in flight, and counts the request; ``release`` ends
it. Installs run through callbacks so the owner of the model decides on which thread they happen.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from adapters.errors import AdapterError, AdapterNotFoundError
from adapters.kinds.base import AdapterWeights

log = logging.getLogger(__name__)


class NoFreeSlotError(AdapterError):
    """Every device slot holds an adapter with requests in flight."""


@dataclass
class AdapterEntry:
    id: str
    weights: AdapterWeights
    created: float = field(default_factory=time.time)
    slot: int | None = None
    in_flight: int = 0
    last_used: float = 0.0
    requests: int = 0

    def describe(self) -> dict:
        return {"id": self.id, **self.weights.describe(), "size_bytes": self.weights.nbytes,
                "created": int(self.created), "tier": "device" if self.slot is not None else "cpu",
                "in_flight": self.in_flight, "requests": self.requests}


class AdapterRegistry:
    def __init__(self, install: Callable[[AdapterWeights], Awaitable[int]],
                 uninstall: Callable[[int], Awaitable[None]], max_device_slots: int):
        self._install = install
        self._uninstall = uninstall
        self.max_device_slots = max_device_slots
        self._entries: dict[str, AdapterEntry] = {}
        self._lock = asyncio.Lock()

    def add(self, adapter_id: str, weights: AdapterWeights) -> AdapterEntry:
        if adapter_id in self._entries:
            raise ValueError(f"adapter {adapter_id!r} is already registered")
        entry = self._entries[adapter_id] = AdapterEntry(adapter_id, weights)
        return entry

    def get(self, adapter_id: str) -> AdapterEntry:
        try:
            return self._entries[adapter_id]
        except KeyError:
            raise AdapterNotFoundError(f"the adapter {adapter_id!r} does not exist") from None

    def __contains__(self, adapter_id: str) -> bool:
        return adapter_id in self._entries

    def entries(self) -> list[AdapterEntry]:
        return sorted(self._entries.values(), key=lambda e: e.id)

    async def acquire(self, adapter_id: str) -> int:
        """Count a request on the adapter and return its device slot, loading it if needed."""
        entry = self.get(adapter_id)
        entry.in_flight += 1  # before any await: the adapter cannot be evicted under us
        entry.requests += 1
        entry.last_used = time.time()
        try:
            async with self._lock:
                if entry.slot is None:
                    await self._make_room()
                    entry.slot = await self._install(entry.weights)
                    log.info("adapter %s loaded into device slot %d", entry.id, entry.slot)
            return entry.slot
        except BaseException:
            entry.in_flight -= 1
            raise

    def release(self, adapter_id: str) -> None:
        entry = self._entries.get(adapter_id)
        if entry is not None:
            entry.in_flight -= 1
            entry.last_used = time.time()

    async def _make_room(self) -> None:
        resident = [e for e in self._entries.values() if e.slot is not None]
        if len(resident) < self.max_device_slots:
            return
        idle = [e for e in resident if e.in_flight == 0]
        if not idle:
            raise NoFreeSlotError(
                f"all {self.max_device_slots} device adapter slots serve requests in flight; retry shortly")
        victim = min(idle, key=lambda e: e.last_used)
        slot, victim.slot = victim.slot, None
        await self._uninstall(slot)
        log.info("adapter %s evicted from device slot %d", victim.id, slot)
