"""Where each adapter lives: device slots (at most M), a CPU LRU of loaded weights (at most N), and
disk (every registered adapter). This is the one owner that evicts.

Rules: an adapter with requests in flight, or pinned, never leaves CPU memory; an adapter whose
device slot is *claimed* (rows of the running batch use it), or pinned, is never evicted from the
device. A request holds its version and CPU copy from arrival (``to_cpu``) but claims a device slot
only when the engine is about to run it (``claim``), so requests waiting in the queue never keep
another adapter off the device. Loading from disk runs in a worker thread so the event loop never
blocks; concurrent requests for the same cold adapter share one load; a claim that finds every
device slot busy waits for one to free.
Imports neither torch nor FastAPI: weights are opaque here, and model work happens in callbacks.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from adapters.errors import AdapterConflictError, AdapterError

log = logging.getLogger(__name__)
DEVICE, CPU, DISK = "device", "cpu", "disk"


class NoFreeSlotError(AdapterError):
    """Every device slot holds an adapter with requests in flight (or pinned), for too long."""


class Resident(Protocol):
    """What the tiers need of an adapter (the registry's entries)."""

    name: str
    weights: Any  # loaded weights in CPU memory, or None
    slot: int | None  # device slot, or None
    in_flight: int  # requests holding this version (queued or running)
    device_users: int  # requests of the running batch using its device slot
    pinned: bool


class TierEvents:
    """Hooks for metrics; the default does nothing."""

    def lookup(self, tier: str, hit: bool) -> None: ...

    def loaded(self, source: str, seconds: float) -> None: ...

    def evicted(self, tier: str) -> None: ...

    def resident(self, counts: dict[str, int]) -> None: ...


class AdapterTiers:
    def __init__(self, *, device_slots: int, cpu_capacity: int, load: Callable[[Any], Any],
                 install: Callable[[Any], Awaitable[int]], uninstall: Callable[[int], Awaitable[None]],
                 slot_wait_seconds: float = 30.0, events: TierEvents | None = None):
        self.device_slots = device_slots
        self.cpu_capacity = cpu_capacity
        self._load = load  # item -> weights, blocking (runs in a thread)
        self._install = install
        self._uninstall = uninstall
        self.slot_wait_seconds = slot_wait_seconds
        self.events = events or TierEvents()
        self._device: OrderedDict[Resident, None] = OrderedDict()  # least recently used first
        self._cpu: OrderedDict[Resident, None] = OrderedDict()
        self._loads: dict[Resident, asyncio.Task] = {}  # single-flight loads onto the device under way
        self._cpu_loads: dict[Resident, asyncio.Task] = {}  # single-flight loads from disk under way
        self._installing = 0  # device slots reserved by installs under way
        self._changed = asyncio.Condition()

    # ---- queries --------------------------------------------------------------------------------
    @staticmethod
    def tier_of(item: Resident) -> str:
        return DEVICE if item.slot is not None else CPU if item.weights is not None else DISK

    def counts(self) -> dict[str, int]:
        return {DEVICE: len(self._device), CPU: len(self._cpu)}

    # ---- moving adapters ------------------------------------------------------------------------
    def admit_cpu(self, item: Resident, weights: Any) -> None:
        """Hold freshly loaded (or just registered) weights in the CPU tier."""
        item.weights = weights
        self._cpu[item] = None
        self._cpu.move_to_end(item)
        self._trim_cpu()
        self._report()

    async def to_device(self, item: Resident) -> int:
        """The item's device slot, loading it from CPU or disk first if needed.

        The load runs as its own task that every caller for the item awaits (single flight). A
        caller that is cancelled (its client went away) therefore neither cancels the others'
        load nor abandons an install already running on the device, which would leak its slot.
        """
        loaded_here = False
        while item.slot is None:
            load = self._loads.get(item)
            if load is None:
                self.events.lookup(DEVICE, False)
                loaded_here = True
                load = self._loads[item] = asyncio.get_running_loop().create_task(self._bring_in(item))
                load.add_done_callback(functools.partial(self._load_finished, item))
            await asyncio.shield(load)  # a failed load raises here, in every caller
        if item in self._device:
            self._device.move_to_end(item)
        if not loaded_here:
            self.events.lookup(DEVICE, True)
        return item.slot

    def _load_finished(self, item: Resident, load: asyncio.Task) -> None:
        if self._loads.get(item) is load:
            del self._loads[item]
        if not load.cancelled():
            load.exception()  # retrieved, even when every caller went away: no "never retrieved" log

    async def to_cpu(self, item: Resident) -> None:
        """Hold the item's weights in CPU memory, loading them from disk once for all callers."""
        if item.weights is not None:
            self.events.lookup(CPU, True)
            if item in self._cpu:
                self._cpu.move_to_end(item)
            return
        load = self._cpu_loads.get(item)
        if load is None:
            self.events.lookup(CPU, False)
            load = self._cpu_loads[item] = asyncio.get_running_loop().create_task(self._load_from_disk(item))
            load.add_done_callback(functools.partial(self._cpu_load_finished, item))
        await asyncio.shield(load)

    async def _load_from_disk(self, item: Resident) -> None:
        started = time.perf_counter()
        weights = await asyncio.to_thread(self._load, item)
        self.events.loaded(DISK, time.perf_counter() - started)
        self.admit_cpu(item, weights)

    def _cpu_load_finished(self, item: Resident, load: asyncio.Task) -> None:
        if self._cpu_loads.get(item) is load:
            del self._cpu_loads[item]
        if not load.cancelled():
            load.exception()

    async def claim(self, item: Resident, *, wait: bool = False) -> int:
        """The item's device slot, held for a request of the running batch until ``unclaim``.
        With ``wait``, a claim that finds every slot busy keeps waiting (the caller bounds the
        wait, e.g. the engine's queue timeout); without, it fails after ``slot_wait_seconds``."""
        while True:
            try:
                slot = await self.to_device(item)
            except NoFreeSlotError:
                if not wait:
                    raise
                continue
            item.device_users += 1  # no await since the slot was seen: it cannot be evicted in between
            return slot

    def unclaim(self, item: Resident) -> bool:
        """A request of the running batch is done with the item's slot; True when none uses it now
        (the caller then calls ``released`` so that a waiting claim can take the slot)."""
        item.device_users -= 1
        return item.device_users == 0

    async def _bring_in(self, item: Resident) -> None:
        await self.to_cpu(item)
        await self._reserve_slot()
        try:
            started = time.perf_counter()
            item.slot = await self._install(item.weights)
            self.events.loaded(CPU, time.perf_counter() - started)
            self._device[item] = None
        finally:
            self._installing -= 1
            async with self._changed:  # a failed install gave its slot back; a new idle item may go
                self._changed.notify_all()
        self._report()
        log.info("adapter %s loaded into device slot %d", item.name, item.slot)

    async def _reserve_slot(self) -> None:
        """Wait until a device slot is free (evicting the least recently used idle adapter if
        needed) and hold it for one install. Installs under way count as taken: otherwise two
        cold adapters could both see the last free slot and the second install would fail."""
        deadline = time.monotonic() + self.slot_wait_seconds
        async with self._changed:
            while len(self._device) + self._installing >= self.device_slots:
                # OrderedDict order: least recently used first
                idle = next((x for x in self._device if x.device_users == 0 and not x.pinned), None)
                if idle is not None:
                    await self._evict_device(idle)
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise NoFreeSlotError(f"all {self.device_slots} device adapter slots are busy; retry shortly")
                try:
                    await asyncio.wait_for(self._changed.wait(), remaining)
                except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
                    pass
                _raise_swallowed_cancel()
            self._installing += 1

    async def _evict_device(self, item: Resident) -> None:
        slot, item.slot = item.slot, None
        del self._device[item]
        await self._uninstall(slot)
        self.events.evicted(DEVICE)
        self._report()
        log.info("adapter %s evicted from device slot %d", item.name, slot)

    def _trim_cpu(self) -> None:
        while len(self._cpu) > self.cpu_capacity:
            victim = next((x for x in self._cpu if x.in_flight == 0 and not x.pinned and x not in self._loads
                           and x not in self._cpu_loads), None)
            if victim is None:
                return  # everything held is busy: over capacity until a release
            del self._cpu[victim]
            victim.weights = None
            self.events.evicted(CPU)
            log.info("adapter %s evicted from the CPU tier", victim.name)

    async def released(self) -> None:
        """A request ended or a pin was lifted: a waiter may now find a slot, the CPU tier may shrink."""
        self._trim_cpu()
        self._report()
        async with self._changed:
            self._changed.notify_all()

    async def pin(self, item: Resident) -> int:
        pinned = sum(1 for x in self._device if x.pinned and x is not item)
        if pinned >= self.device_slots:
            raise AdapterConflictError(f"all {self.device_slots} device slots hold pinned adapters; unpin one first")
        item.pinned = True
        try:
            return await self.to_device(item)
        except BaseException:
            item.pinned = False
            raise

    async def release_device(self, item: Resident) -> bool:
        """Give the item's device slot back now, if no request of the running batch uses it and it
        is not pinned; True when it left the device. A router that steers an adapter's requests to
        one replica calls this when it stops doing so (Ray Serve's multiplexing evicted the id), so
        the slot goes to the adapters routed here instead of waiting for the LRU to notice."""
        async with self._changed:
            if item not in self._device or item.device_users > 0 or item.pinned:
                return False
            await self._evict_device(item)
            self._changed.notify_all()  # a claim waiting for a slot may take this one
        return True

    async def drop(self, item: Resident) -> None:
        """Forget the item in every memory tier (after its last request)."""
        for pending in (self._cpu_loads.get(item), self._loads.get(item)):
            if pending is not None:
                await asyncio.wait({pending})  # not gather: cancelling us must not cancel the shared load
        if item.slot is not None:
            await self._evict_device(item)
        self._cpu.pop(item, None)
        item.weights = None
        self._report()
        async with self._changed:
            self._changed.notify_all()

    def _report(self) -> None:
        self.events.resident(self.counts())


def _raise_swallowed_cancel() -> None:
    """Python 3.11's ``wait_for`` returns normally when its task is cancelled just as the wait
    completes (CPython gh-86296, fixed in 3.12): the cancellation is lost, and a device load
    cancelled at shutdown would wait on for a slot. The task still counts the request
    (``Task.cancelling``, 3.11+), so it is raised here. (A Condition cannot use
    ``gateway.waiting.wait_event``: its wait must re-acquire the lock in this task.)"""
    task = asyncio.current_task()
    if task is not None and getattr(task, "cancelling", lambda: 0)():
        raise asyncio.CancelledError
