"""AdapterTiers on its own: fake adapters, a fake device with a fixed number of slots that refuses
an install when full (as the runtime does), and a fake disk. No torch, no model."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from dataclasses import dataclass

import pytest

from adapters.errors import AdapterConflictError
from adapters.tiers import CPU, DEVICE, DISK, AdapterTiers, NoFreeSlotError, TierEvents


@dataclass(eq=False)
class Item:
    name: str
    weights: object = None
    slot: int | None = None
    in_flight: int = 0
    device_users: int = 0
    pinned: bool = False


class FakeDevice:
    """Slots 1..n. ``install`` hops to a worker thread, like the engine-thread install of the app:
    cancelling the awaiting coroutine does not stop an install already running."""

    def __init__(self, slots: int):
        self.installed: dict[int, object] = {}
        self.capacity = slots
        self.installs = 0
        self.refused = 0
        self.fail_next = False
        self.gate: threading.Event | None = None  # when set, installs wait for it
        self.started = threading.Event()
        self.finished = threading.Event()
        self._lock = threading.Lock()

    def _install(self, weights: object) -> int:
        self.started.set()
        if self.gate is not None:
            assert self.gate.wait(10)
        try:
            with self._lock:
                if self.fail_next:
                    self.fail_next = False
                    raise RuntimeError("install failed")
                free = [s for s in range(1, self.capacity + 1) if s not in self.installed]
                if not free:
                    self.refused += 1
                    raise RuntimeError("no free adapter slot on the device")
                self.installed[free[0]] = weights
                self.installs += 1
                return free[0]
        finally:
            self.finished.set()

    async def install(self, weights: object) -> int:
        return await asyncio.to_thread(self._install, weights)

    async def uninstall(self, slot: int) -> None:
        await asyncio.sleep(0)
        with self._lock:
            del self.installed[slot]


class FakeDisk:
    def __init__(self) -> None:
        self.loads: Counter[str] = Counter()
        self.failing: set[str] = set()
        self.gate: threading.Event | None = None

    def load(self, item: Item) -> object:  # blocking, runs in a worker thread
        if self.gate is not None:
            assert self.gate.wait(10)
        self.loads[item.name] += 1
        if item.name in self.failing:
            raise OSError(f"cannot read {item.name}")
        return f"weights of {item.name}"


class RecordingEvents(TierEvents):
    def __init__(self) -> None:
        self.counts: Counter[tuple] = Counter()
        self.last_resident: dict[str, int] = {}

    def lookup(self, tier: str, hit: bool) -> None:
        self.counts["lookup", tier, "hit" if hit else "miss"] += 1

    def loaded(self, source: str, seconds: float) -> None:
        assert seconds >= 0
        self.counts["loaded", source] += 1

    def evicted(self, tier: str) -> None:
        self.counts["evicted", tier] += 1

    def resident(self, counts: dict[str, int]) -> None:
        self.last_resident = dict(counts)


@dataclass
class Setup:
    tiers: AdapterTiers
    device: FakeDevice
    disk: FakeDisk
    events: RecordingEvents


def make(device_slots: int = 2, cpu_capacity: int = 8, slot_wait_seconds: float = 10.0) -> Setup:
    device, disk, events = FakeDevice(device_slots), FakeDisk(), RecordingEvents()
    tiers = AdapterTiers(device_slots=device_slots, cpu_capacity=cpu_capacity, load=disk.load,
                         install=device.install, uninstall=device.uninstall,
                         slot_wait_seconds=slot_wait_seconds, events=events)
    return Setup(tiers, device, disk, events)


def run(coro):
    return asyncio.run(coro)


async def until(condition, what: str) -> None:
    """Let other tasks (and worker threads) run until ``condition()`` holds."""
    for _ in range(2000):
        if condition():
            return
        await asyncio.sleep(0.001)
    raise AssertionError(f"never happened: {what}")


def tiers_of(items: list[Item]) -> dict[str, str]:
    return {x.name: AdapterTiers.tier_of(x) for x in items}


def check_consistent(s: Setup, items: list[Item]) -> None:
    """The tiers' view and the device's agree: every slot held by exactly one item, none leaked."""
    on_device = {x.slot: x.weights for x in items if x.slot is not None}
    assert set(on_device) == set(s.device.installed)
    assert s.tiers.counts()[DEVICE] == len(on_device) <= s.tiers.device_slots
    assert s.device.refused == 0


# ---- LRU order ----------------------------------------------------------------------------------
def test_device_lru_evicts_the_least_recently_used():
    async def main():
        s = make(device_slots=2)
        a, b, c = Item("a"), Item("b"), Item("c")
        await s.tiers.to_device(a)
        await s.tiers.to_device(b)
        await s.tiers.to_device(a)  # a is now the most recently used
        await s.tiers.to_device(c)
        assert tiers_of([a, b, c]) == {"a": DEVICE, "b": CPU, "c": DEVICE}
        await s.tiers.to_device(b)  # now a is the least recently used
        assert tiers_of([a, b, c]) == {"a": CPU, "b": DEVICE, "c": DEVICE}
        assert s.events.counts["evicted", DEVICE] == 2
        assert s.disk.loads == {"a": 1, "b": 1, "c": 1}  # b came back from the CPU tier
        check_consistent(s, [a, b, c])

    run(main())


def test_cpu_lru_evicts_the_least_recently_used():
    async def main():
        s = make(device_slots=1, cpu_capacity=2)
        a, b, c = Item("a"), Item("b"), Item("c")
        await s.tiers.to_device(a)
        await s.tiers.to_device(b)  # CPU: a, b
        await s.tiers.to_device(a)  # CPU hit: b, a
        await s.tiers.to_device(c)  # CPU: b, a, c -> b goes
        assert tiers_of([a, b, c]) == {"a": CPU, "b": DISK, "c": DEVICE}
        assert b.weights is None and a.weights == "weights of a"
        assert s.disk.loads == {"a": 1, "b": 1, "c": 1}
        assert s.events.counts["evicted", CPU] == 1
        await s.tiers.to_device(b)  # from disk again
        assert s.disk.loads["b"] == 2
        check_consistent(s, [a, b, c])

    run(main())


def test_cpu_tier_keeps_busy_items_over_capacity_until_released():
    async def main():
        s = make(device_slots=3, cpu_capacity=1)
        a, b = Item("a", in_flight=1), Item("b", in_flight=1)
        await s.tiers.to_device(a)
        await s.tiers.to_device(b)
        assert a.weights is not None and b.weights is not None  # both busy: over capacity
        assert s.tiers.counts()[CPU] == 2
        a.in_flight = 0
        await s.tiers.released()
        assert a.weights is None and b.weights is not None
        assert a.slot is not None  # the CPU copy went; the device copy stays
        assert s.tiers.counts()[CPU] == 1

    run(main())


# ---- never evicted: claimed, pinned ---------------------------------------------------------------
def test_claimed_and_pinned_are_never_evicted():
    async def main():
        s = make(device_slots=2, slot_wait_seconds=0.01)
        busy, pinned, cold = Item("busy", in_flight=1), Item("pinned"), Item("cold")
        await s.tiers.claim(busy)
        await s.tiers.pin(pinned)
        with pytest.raises(NoFreeSlotError, match="2 device adapter slots are busy"):
            await s.tiers.claim(cold)
        assert tiers_of([busy, pinned, cold]) == {"busy": DEVICE, "pinned": DEVICE, "cold": CPU}
        assert s.events.counts["evicted", DEVICE] == 0
        check_consistent(s, [busy, pinned, cold])
        assert s.tiers.unclaim(busy)  # now the busy one is idle and may go
        await s.tiers.released()
        await s.tiers.claim(cold)
        assert tiers_of([busy, pinned, cold]) == {"busy": CPU, "pinned": DEVICE, "cold": DEVICE}
        check_consistent(s, [busy, pinned, cold])

    run(main())


def test_a_queued_request_does_not_hold_the_device():
    """An adapter whose requests are only waiting (in flight, not claimed) gives its device slot to
    a claim, and keeps its CPU copy: waiting requests never starve other adapters of slots."""
    async def main():
        s = make(device_slots=1, cpu_capacity=1, slot_wait_seconds=0.01)
        queued, running = Item("queued", in_flight=1), Item("running", in_flight=1)
        await s.tiers.to_device(queued)  # it was on the device, but no row of the batch uses it
        assert await s.tiers.claim(running) == 1
        assert tiers_of([queued, running]) == {"queued": CPU, "running": DEVICE}
        assert queued.weights is not None  # in flight: its CPU copy stays even over capacity

    run(main())


def test_a_waiting_claim_outlasts_the_slot_wait_and_gets_the_next_free_slot():
    async def main():
        s = make(device_slots=1, slot_wait_seconds=0.01)
        a, b = Item("a", in_flight=1), Item("b", in_flight=1)
        await s.tiers.claim(a)
        waiting = asyncio.create_task(s.tiers.claim(b, wait=True))
        await asyncio.sleep(0.1)  # ten slot waits
        assert not waiting.done() and b.slot is None
        s.tiers.unclaim(a)
        await s.tiers.released()
        assert await waiting == 1 and b.device_users == 1 and a.slot is None
        check_consistent(s, [a, b])

    run(main())


def test_to_cpu_loads_once_for_concurrent_callers_and_takes_no_slot():
    async def main():
        s = make(device_slots=1)
        item = Item("x", in_flight=2)
        await asyncio.gather(s.tiers.to_cpu(item), s.tiers.to_cpu(item))
        assert s.disk.loads["x"] == 1 and item.weights is not None and item.slot is None

    run(main())


async def b_waits_for_the_slot_a_holds() -> tuple[Setup, Item, Item, asyncio.Task]:
    """One device slot, claimed for ``a``; a claim for ``b`` (loaded into CPU) waiting for it."""
    s = make(device_slots=1, slot_wait_seconds=30)
    a, b = Item("a", in_flight=1), Item("b", in_flight=1)
    await s.tiers.claim(a)
    waiting = asyncio.create_task(s.tiers.claim(b))
    await until(lambda: b.weights is not None, "b loaded into CPU")
    for _ in range(5):
        await asyncio.sleep(0)
    return s, a, b, waiting


def test_a_request_waits_for_a_slot_to_free():
    async def main():
        s, a, b, waiting = await b_waits_for_the_slot_a_holds()
        assert not waiting.done() and b.slot is None
        s.tiers.unclaim(a)
        await s.tiers.released()
        slot = await waiting
        assert b.slot == slot and a.slot is None
        check_consistent(s, [a, b])

    run(main())


def test_a_device_load_cancelled_as_a_notification_lands_is_cancelled():
    """The load task waiting for a slot (shared by the item's requests) is cancelled in the turn
    after its wait completed and before it resumed, where Python 3.11's wait_for swallows the
    cancellation: it must still end cancelled (a shutdown cancels it), not wait on for a slot."""
    async def main():
        s, a, b, waiting = await b_waits_for_the_slot_a_holds()
        load = s.tiers._loads[b]
        async with s.tiers._changed:  # a notification that frees nothing: a still holds the slot
            s.tiers._changed.notify_all()
        await asyncio.sleep(0)  # the inner wait completes; the load task has not resumed yet
        load.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(waiting, 5)  # 3.11 before the fix: the load waited on, TimeoutError here
        assert load.cancelled() and b.slot is None and s.device.installs == 1
        s.tiers.unclaim(a)
        await s.tiers.released()
        check_consistent(s, [a, b])

    run(main())


def test_no_free_slot_error_leaves_state_clean_and_a_later_try_works():
    async def main():
        s = make(device_slots=1, slot_wait_seconds=0.01)
        a, b = Item("a", in_flight=1), Item("b", in_flight=1)
        await s.tiers.claim(a)
        for _ in range(2):  # a failed wait must not leave anything behind that blocks the next
            with pytest.raises(NoFreeSlotError):
                await s.tiers.to_device(b)
            assert b.slot is None and s.device.installs == 1
        s.tiers.unclaim(a)
        await s.tiers.released()
        assert await s.tiers.to_device(b) == 1
        check_consistent(s, [a, b])

    run(main())


# ---- single flight ------------------------------------------------------------------------------
def test_concurrent_requests_for_a_cold_item_share_one_load():
    async def main():
        s = make()
        s.disk.gate = threading.Event()
        a = Item("a")
        first = asyncio.create_task(s.tiers.to_device(a))
        second = asyncio.create_task(s.tiers.to_device(a))
        for _ in range(5):
            await asyncio.sleep(0)
        s.disk.gate.set()
        slots = await asyncio.gather(first, second)
        assert slots[0] == slots[1] == a.slot
        assert s.disk.loads == {"a": 1} and s.device.installs == 1
        assert s.events.counts["loaded", DISK] == 1 and s.events.counts["loaded", CPU] == 1
        check_consistent(s, [a])

    run(main())


def test_concurrent_cold_items_never_install_more_than_the_slots():
    """Two different cold adapters and one slot: the second must wait for (or evict) the first,
    not race it onto a device that has no room."""

    async def main():
        s = make(device_slots=1)
        items = [Item(f"x{i}") for i in range(3)]
        slots = await asyncio.gather(*(s.tiers.to_device(x) for x in items))
        assert slots == [1, 1, 1]
        check_consistent(s, items)
        assert sum(x.slot is not None for x in items) == 1

    run(main())


def test_a_failing_disk_load_reaches_every_waiter_and_leaves_nothing():
    async def main():
        s = make()
        s.disk.gate = threading.Event()
        s.disk.failing.add("a")
        a = Item("a")
        tasks = [asyncio.create_task(s.tiers.to_device(a)) for _ in range(2)]
        for _ in range(5):
            await asyncio.sleep(0)
        s.disk.gate.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(r, OSError) and "cannot read a" in str(r) for r in results)
        assert s.disk.loads == {"a": 1}
        assert a.slot is None and a.weights is None
        assert s.tiers.counts() == {DEVICE: 0, CPU: 0} and not s.device.installed
        s.disk.failing.clear()  # the failure is not remembered: the next try loads again
        assert await s.tiers.to_device(a) == 1
        check_consistent(s, [a])

    run(main())


def test_a_failing_install_reaches_every_waiter_and_leaves_no_slot():
    async def main():
        s = make(device_slots=1)
        s.device.fail_next = True
        a = Item("a")
        results = await asyncio.gather(*(s.tiers.to_device(a) for _ in range(2)), return_exceptions=True)
        assert all(isinstance(r, RuntimeError) and "install failed" in str(r) for r in results)
        assert a.slot is None and s.tiers.counts()[DEVICE] == 0 and not s.device.installed
        assert await s.tiers.to_device(a) == 1  # the reserved slot was given back
        check_consistent(s, [a])

    run(main())


def test_a_cancelled_caller_neither_leaks_the_slot_nor_fails_the_others():
    """The first caller goes away (client disconnect) while the install runs on the device: the
    install still completes, the tiers record its slot, and a second caller gets that slot."""

    async def main():
        s = make(device_slots=1)
        s.device.gate = threading.Event()
        a = Item("a")
        leader = asyncio.create_task(s.tiers.to_device(a))
        await until(s.device.started.is_set, "install started")
        follower = asyncio.create_task(s.tiers.to_device(a))
        await asyncio.sleep(0)
        leader.cancel()
        await asyncio.gather(leader, return_exceptions=True)
        s.device.gate.set()
        await until(s.device.finished.is_set, "install finished")
        assert await follower == 1
        assert await s.tiers.to_device(a) == 1
        assert s.device.installs == 1
        check_consistent(s, [a])
        b = Item("b")
        await s.tiers.to_device(b)  # the one slot is usable: a (idle) makes room
        check_consistent(s, [a, b])

    run(main())


# ---- drop and pin -------------------------------------------------------------------------------
def test_drop_forgets_every_memory_tier():
    async def main():
        s = make()
        a = Item("a")
        await s.tiers.to_device(a)
        await s.tiers.drop(a)
        assert a.slot is None and a.weights is None and AdapterTiers.tier_of(a) == DISK
        assert s.tiers.counts() == {DEVICE: 0, CPU: 0} and not s.device.installed
        assert s.events.last_resident == {DEVICE: 0, CPU: 0}

    run(main())


def test_drop_during_a_load_waits_for_it_then_frees():
    async def main():
        s = make()
        s.disk.gate = threading.Event()
        a = Item("a")
        loading = asyncio.create_task(s.tiers.to_device(a))
        await asyncio.sleep(0)
        dropping = asyncio.create_task(s.tiers.drop(a))
        await asyncio.sleep(0)
        assert not dropping.done()
        s.disk.gate.set()
        await asyncio.gather(loading, dropping)
        assert a.slot is None and a.weights is None and not s.device.installed

    run(main())


def test_pin_beyond_the_slots_is_a_conflict():
    async def main():
        s = make(device_slots=2)
        a, b, c = Item("a"), Item("b"), Item("c")
        await s.tiers.pin(a)
        await s.tiers.pin(b)
        await s.tiers.pin(a)  # pinning again what is pinned is fine
        with pytest.raises(AdapterConflictError, match="pinned"):
            await s.tiers.pin(c)
        assert not c.pinned and c.slot is None
        a.pinned = False  # unpin: the slot may now be taken
        await s.tiers.released()
        await s.tiers.pin(c)
        assert tiers_of([a, b, c]) == {"a": CPU, "b": DEVICE, "c": DEVICE}
        check_consistent(s, [a, b, c])

    run(main())


def test_a_pin_that_cannot_get_a_slot_is_undone():
    async def main():
        s = make(device_slots=1, slot_wait_seconds=0.01)
        busy, other = Item("busy", in_flight=1), Item("other")
        await s.tiers.claim(busy)
        with pytest.raises(NoFreeSlotError):
            await s.tiers.pin(other)
        assert not other.pinned and other.slot is None

    run(main())


# ---- events -------------------------------------------------------------------------------------
def test_events_count_hits_misses_loads_evictions_and_residents():
    async def main():
        s = make(device_slots=1, cpu_capacity=1)
        a, b = Item("a"), Item("b")
        await s.tiers.to_device(a)
        assert s.events.counts == Counter({("lookup", DEVICE, "miss"): 1, ("lookup", CPU, "miss"): 1,
                                           ("loaded", DISK): 1, ("loaded", CPU): 1})
        assert s.events.last_resident == {DEVICE: 1, CPU: 1}
        await s.tiers.to_device(a)
        assert s.events.counts["lookup", DEVICE, "hit"] == 1
        await s.tiers.to_device(b)  # b's weights push a's out of the CPU, then b takes a's slot
        assert s.events.counts["evicted", CPU] == 1 and s.events.counts["evicted", DEVICE] == 1
        assert s.events.counts["loaded", DISK] == 2 and s.events.counts["loaded", CPU] == 2
        assert s.events.last_resident == {DEVICE: 1, CPU: 1}
        await s.tiers.to_device(a)  # from disk again (its CPU copy is gone): misses on both tiers
        assert s.events.counts["lookup", DEVICE, "miss"] == 3 and s.events.counts["lookup", CPU, "miss"] == 3

    run(main())


def test_a_cancelled_drop_does_not_cancel_the_load_it_waits_for():
    async def main():
        s = make()
        s.disk.gate = threading.Event()
        a = Item("a")
        loading = asyncio.create_task(s.tiers.to_device(a))
        await asyncio.sleep(0)
        dropping = asyncio.create_task(s.tiers.drop(a))
        await asyncio.sleep(0)
        dropping.cancel()
        await asyncio.gather(dropping, return_exceptions=True)
        s.disk.gate.set()
        assert await loading == 1
        check_consistent(s, [a])

    run(main())


def test_release_device_frees_an_idle_slot_but_never_a_claimed_or_pinned_one():
    """A router's "this adapter is no longer routed here" (Ray Serve evicting a multiplexed id)
    frees the slot at once when idle; a claimed or pinned adapter stays on the device."""
    async def main():
        s = make(device_slots=3)
        idle, busy, pinned, cold = Item("idle"), Item("busy", in_flight=1), Item("pinned"), Item("cold")
        await s.tiers.to_device(idle)
        await s.tiers.claim(busy)
        await s.tiers.pin(pinned)
        assert await s.tiers.release_device(idle)
        assert not await s.tiers.release_device(busy)
        assert not await s.tiers.release_device(pinned)
        assert not await s.tiers.release_device(cold)  # never loaded: nothing to free
        assert tiers_of([idle, busy, pinned, cold]) == {"idle": CPU, "busy": DEVICE, "pinned": DEVICE, "cold": DISK}
        assert s.events.counts["evicted", DEVICE] == 1
        await s.tiers.to_device(cold)  # the freed slot is taken without evicting anyone
        assert s.events.counts["evicted", DEVICE] == 1
        check_consistent(s, [idle, busy, pinned, cold])

    run(main())
