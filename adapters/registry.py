"""Adapter ids and their versions: register (validate, store, persist), replace, delete, pin, and
lease an adapter to a request.

A registration is committed by one row write, after its files are whole on disk; a crash before
that leaves only orphan files, which ``start`` moves into the blob store's quarantine (never deletes:
the database may be the part that is missing). A replace swaps the id to a new version at
once: requests holding a lease finish on the old version, which is freed after its last one. A
delete hides the id at once, then waits for in-flight requests before freeing memory and files.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from adapters.errors import (
    AdapterConflictError, AdapterNotFoundError, AdapterUnavailableError, AdapterValidationError,
)
from adapters.kinds.base import AdapterWeights
from adapters.shared_blobs import AnyBlobStore
from adapters.sql import Transaction
from adapters.store import AdapterRecord, AdapterStore, RowGuard
from adapters.tiers import AdapterTiers, TierEvents

log = logging.getLogger(__name__)
T = TypeVar("T")
# Shared with pydantic (training config), whose Rust engine reads "$" as the end of the text. Python's
# "$" also matches before a trailing newline, so here the pattern is only ever used with fullmatch.
ADAPTER_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
_ADAPTER_ID = re.compile(ADAPTER_ID_PATTERN)
# a guard returns why an id may not be registered / deleted, or None
Guard = Callable[[str], str | None]
IdRowGuard = Callable[[Transaction, str], str | None]  # a Guard read from the database, in a write's transaction


@dataclass
class AdapterStats:
    """Usage of one id, across its versions (in memory; Prometheus keeps the long view)."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    last_used: float | None = None


@dataclass(eq=False)  # identity hashing: the tiers key on the entry object
class AdapterEntry:
    """One registered version of an adapter id."""

    record: AdapterRecord
    stats: AdapterStats
    weights: AdapterWeights | None = None
    slot: int | None = None
    in_flight: int = 0
    device_users: int = 0  # requests of the running batch on its device slot
    missing: bool = False  # the row exists but its files do not
    retired: bool = False  # replaced or deleted: takes no new requests
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.idle.set()

    @property
    def name(self) -> str:
        return f"{self.record.id}@{self.record.content_hash[:12]}"

    @property
    def id(self) -> str:
        return self.record.id

    @property
    def pinned(self) -> bool:
        return self.record.pinned

    @pinned.setter
    def pinned(self, value: bool) -> None:
        self.record.pinned = value

    @property
    def virtual_tokens(self) -> int:
        return int(self.record.info.get("virtual_tokens", 0))

    @property
    def created(self) -> float:
        return self.record.created

    def describe(self) -> dict[str, Any]:
        info = {k: v for k, v in self.record.info.items() if k != "virtual_tokens"}
        tier = "missing" if self.missing else AdapterTiers.tier_of(self)
        return {"id": self.id, **info, "size_bytes": self.record.size_bytes,
                "content_hash": self.record.content_hash, "created": int(self.record.created), "tier": tier,
                "pinned": self.pinned, "in_flight": self.in_flight, "requests": self.stats.requests,
                "prompt_tokens": self.stats.prompt_tokens, "completion_tokens": self.stats.completion_tokens,
                "last_used": None if self.stats.last_used is None else int(self.stats.last_used)}


@dataclass(eq=False)
class AdapterLease:
    """One request's hold on one adapter version, and once claimed, on its device slot;
    ``release`` exactly once (later calls are no-ops)."""

    entry: AdapterEntry
    _registry: AdapterRegistry
    slot: int | None = None  # set by ``claim_device``
    _claimed: bool = False
    _released: bool = False

    async def claim_device(self, *, wait: bool = False) -> int:
        """The version's device slot, held until ``release`` (see ``AdapterTiers.claim``)."""
        if self._released:
            raise AdapterUnavailableError("the request ended before its adapter reached the device")
        slot = await self._registry.tiers.claim(self.entry, wait=wait)
        self._claimed = True
        if self._released:  # released while the claim waited: give the slot back at once
            self._unclaim()
            raise AdapterUnavailableError("the request ended before its adapter reached the device")
        self.slot = slot
        return slot

    def release(self) -> None:
        if not self._released:
            self._released = True
            if self._claimed:
                self._unclaim()
            self._registry._release(self.entry)

    def _unclaim(self) -> None:
        self._claimed = False
        if self._registry.tiers.unclaim(self.entry):
            self._registry._in_background(self._registry.tiers.released())


class AdapterRegistry:
    def __init__(self, *, store: AdapterStore, blobs: AnyBlobStore, read: Callable[[Path], AdapterWeights],
                 install: Callable[[AdapterWeights], Awaitable[int]], uninstall: Callable[[int], Awaitable[None]],
                 device_slots: int, cpu_capacity: int, slot_wait_seconds: float = 30.0,
                 events: TierEvents | None = None):
        self.store = store
        self.blobs = blobs
        self._read = read  # validating reader of a PEFT folder (blocking)
        self.tiers = AdapterTiers(
            device_slots=device_slots, cpu_capacity=cpu_capacity, install=install, uninstall=uninstall,
            load=self._load_stored,
            slot_wait_seconds=slot_wait_seconds, events=events)
        self._entries: dict[str, AdapterEntry] = {}
        self._stats: dict[str, AdapterStats] = {}
        self._lock = asyncio.Lock()  # one registration / deletion at a time
        self._name_guards: list[Guard] = []
        self._delete_guards: list[Guard] = []
        # the same, read from the database in the registering / deleting transaction: what another
        # replica wrote and this one has not heard of yet (an experiment created there, on this
        # adapter or under this name)
        self._name_row_guards: list[IdRowGuard] = []
        self._row_guards: list[IdRowGuard] = []
        self._retiring: set[asyncio.Task] = set()
        self.on_removed: list[Callable[[str], None]] = []  # ids deleted (metrics drop their labels)

    # ---- guards ---------------------------------------------------------------------------------
    def add_name_guard(self, guard: Guard, row_guard: IdRowGuard | None = None) -> None:
        """``guard(id)`` says why an id may not be registered (the base model's name, an experiment's);
        ``row_guard(tx, id)`` says it from the database, inside the registration's transaction."""
        self._name_guards.append(guard)
        if row_guard is not None:
            self._name_row_guards.append(row_guard)

    def add_delete_guard(self, guard: Guard, row_guard: IdRowGuard | None = None) -> None:
        """``guard(id)`` says why an adapter may not be deleted now (a running experiment uses it);
        ``row_guard(tx, id)`` says it from the database, inside the delete's transaction."""
        self._delete_guards.append(guard)
        if row_guard is not None:
            self._row_guards.append(row_guard)

    @staticmethod
    def _rows_allow(guards: list[IdRowGuard], adapter_id: str) -> RowGuard | None:
        """One transaction check over ``guards``, for the store (None when there is none)."""
        if not guards:
            return None
        return lambda tx: next((reason for guard in guards if (reason := guard(tx, adapter_id)) is not None), None)

    # ---- lookups --------------------------------------------------------------------------------
    def __contains__(self, adapter_id: str) -> bool:
        return adapter_id in self._entries

    def get(self, adapter_id: str) -> AdapterEntry:
        try:
            return self._entries[adapter_id]
        except KeyError:
            raise AdapterNotFoundError(f"the adapter {adapter_id!r} does not exist") from None

    def entries(self) -> list[AdapterEntry]:
        return sorted(self._entries.values(), key=lambda e: e.id)

    def _load_stored(self, entry: AdapterEntry) -> AdapterWeights:
        """The stored version's weights (blocking). They were valid when registered: a file that no
        longer reads (damaged, truncated, gone) is the server's fault, a 503 and an error log, never
        the 400 a client's bad upload gets."""
        try:
            return self._read(self.blobs.fetch(entry.record.content_hash))
        except (AdapterValidationError, OSError) as exc:
            log.error("adapter %s: its stored files (%s) cannot be read: %s", entry.name,
                      entry.record.content_hash[:12], exc)
            raise AdapterUnavailableError(f"the adapter {entry.record.id!r} cannot be loaded: its stored files are "
                                          "damaged or missing; register it again") from None

    def read_weights(self, adapter_id: str) -> AdapterWeights:
        """The adapter's weights read afresh from its stored files (blocking: a worker thread); a
        training job starts from them, and the served copy is never touched."""
        entry = self._servable(adapter_id)
        return self._read(self.blobs.fetch(entry.record.content_hash))

    def stats(self, adapter_id: str) -> AdapterStats | None:
        return self._stats.get(adapter_id)

    @property
    def quarantined_blobs(self) -> int:
        """Stored adapters no row refers to, kept in quarantine at start (never deleted; see blobs)."""
        return len(self.blobs.quarantined())

    # ---- start ----------------------------------------------------------------------------------
    async def start(self) -> None:
        """Load the rows, reconcile files with them, and bring pinned adapters onto the device."""
        records = await asyncio.to_thread(self.store.load_all)
        missing = set(await asyncio.to_thread(self.blobs.reconcile, {r.content_hash for r in records}))
        for record in records:
            entry = self._new_entry(record)
            entry.missing = record.content_hash in missing
            if entry.missing:
                log.error("adapter %s: its files (%s) are missing; it is listed but not served until "
                          "re-registered or deleted", record.id, record.content_hash)
            self._entries[record.id] = entry
        for entry in self.entries():
            if entry.pinned and not entry.missing:
                try:
                    await self.tiers.pin(entry)
                except Exception as exc:  # noqa: BLE001 - one bad adapter must not stop the server
                    log.error("adapter %s: pinned but could not be loaded: %s", entry.id, exc)
        log.info("registry: %d adapter(s) registered, %d with missing files, %d row(s) that do not read, "
                 "%d unreferenced blob(s) in quarantine", len(records), len(missing), len(self.store.unreadable),
                 self.quarantined_blobs)

    async def sync(self) -> None:
        """Make memory match the store's rows after changes another process made (replicas sharing
        one database), with the semantics of the local calls: a new row is servable at once (its
        weights load lazily from the blob store by content hash, at its first request); a changed
        content hash replaces the version (leased requests finish on the old one, new ones get the
        new one); a row gone deletes the id (new requests fail at once, in-flight ones finish); a
        changed pin pins or unpins here too. Changes this process made are in memory already, so
        applying them again changes nothing. Rows are read under the registry's lock: a local
        register or delete is never half seen."""
        retired: list[AdapterEntry] = []
        removed: list[AdapterEntry] = []
        pins: list[tuple[AdapterEntry, bool]] = []
        async with self._lock:
            records = await asyncio.to_thread(self.store.load_all)
            # whether files exist is asked only of rows new here, changed, or missing their files
            # (with a shared store on S3 each answer is a request: not every row at every resync)
            unsure = [r for r in records if (known := self._entries.get(r.id)) is None
                      or known.record.content_hash != r.content_hash or known.missing]
            present = set(await asyncio.to_thread(
                lambda: {r.content_hash for r in unsure if self.blobs.exists(r.content_hash)}))
            rows = {r.id: r for r in records}
            # a row that does not read (edited by hand, or a newer release's) changes nothing here:
            # the version this replica read last is served on (adapters.stored_rows)
            for adapter_id in [i for i in self._entries if i not in rows and i not in self.store.unreadable]:
                removed.append(self._entries.pop(adapter_id))  # hidden before any await
                self._stats.pop(adapter_id, None)
            for record in records:
                entry = self._entries.get(record.id)
                if entry is not None and entry.record.content_hash == record.content_hash:
                    if entry.missing:
                        entry.missing = record.content_hash not in present
                    if entry.pinned != record.pinned:
                        pins.append((entry, record.pinned))
                    continue
                new = self._new_entry(record)
                new.missing = record.content_hash not in present
                self._entries[record.id] = new
                if record.pinned and not new.missing:
                    pins.append((new, True))
                if entry is not None:
                    retired.append(entry)
        for entry in retired:
            log.info("adapter %s replaced by another replica", entry.name)
            entry.retired, entry.pinned = True, False
            self._retire_later(entry)
        for entry in removed:
            log.info("adapter %s deleted by another replica; waiting for %d request(s) in flight", entry.name,
                     entry.in_flight)
            self._in_background(self._retire_removed(entry))
        for entry, pinned in pins:
            if pinned:
                try:
                    await self.tiers.pin(entry)
                except Exception as exc:  # noqa: BLE001 - one bad adapter must not stop the sync
                    log.error("adapter %s: pinned by another replica but could not be loaded here: %s",
                              entry.name, exc)
            else:
                entry.pinned = False
                await self.tiers.released()

    async def _retire_removed(self, entry: AdapterEntry) -> None:
        await self._retire(entry)
        if entry.id not in self._entries:  # unless registered again meanwhile
            for callback in self.on_removed:
                callback(entry.id)

    def _new_entry(self, record: AdapterRecord) -> AdapterEntry:
        stats = self._stats.setdefault(record.id, AdapterStats())
        return AdapterEntry(record=record, stats=stats)

    # ---- register / replace / delete ------------------------------------------------------------
    def check_id(self, adapter_id: str) -> None:
        if not isinstance(adapter_id, str) or not _ADAPTER_ID.fullmatch(adapter_id):
            raise AdapterValidationError(
                "the adapter id must be 1-64 characters: letters, digits, '.', '_' or '-', starting with a "
                "letter or digit")
        for guard in self._name_guards:
            if (reason := guard(adapter_id)) is not None:
                raise AdapterConflictError(reason)

    async def register(self, adapter_id: str | None, source_dir: Path, *, replace: bool = False) -> AdapterEntry:
        """Validate the PEFT folder ``source_dir``, store its files, and serve it under ``adapter_id``
        (generated when None). The caller keeps ``source_dir``."""
        adapter_id = adapter_id or f"adapter-{uuid.uuid4().hex[:12]}"
        self.check_id(adapter_id)
        if adapter_id in self._entries and not replace:  # early, before reading big files
            raise AdapterConflictError(f"the adapter {adapter_id!r} is already registered; ask for replace")
        weights = await asyncio.to_thread(self._read, source_dir)
        # shielded: a caller cancelled meanwhile (a shutdown) must not leave a committed row
        # without its files, or files removed under it; the version is stored or not, wholly
        entry = await _settled(self._store_version(adapter_id, source_dir, weights, replace))
        if entry.pinned:
            try:
                await self.tiers.pin(entry)
            except Exception as exc:  # noqa: BLE001 - the replace is committed and served: it must not read as failed
                # out of device memory, say: the entry shows unpinned; the row keeps the pin, which
                # the next start restores (or pin it again now)
                log.error("adapter %s: replaced, but its pin could not be restored now: %s", entry.name, exc)
        return entry

    async def _store_version(self, adapter_id: str, source_dir: Path, weights: AdapterWeights,
                             replace: bool) -> AdapterEntry:
        """Store the files, commit the row, serve the new entry and retire the one it replaces."""
        async with self._lock:
            self.check_id(adapter_id)  # again: a guarded name (an experiment) may have appeared meanwhile
            old = self._entries.get(adapter_id)
            if old is not None and not replace:
                raise AdapterConflictError(f"the adapter {adapter_id!r} is already registered; ask for replace")
            digest, created = await asyncio.to_thread(self.blobs.add, source_dir)
            info = {**weights.describe(), "virtual_tokens": weights.virtual_tokens}
            record = AdapterRecord(id=adapter_id, content_hash=digest, kind=weights.kind.value,
                                   size_bytes=self.blobs.size(digest), created=time.time(),
                                   pinned=old.pinned if old is not None else False, info=info)
            try:  # the commit point; the row's pin stands (another replica may have changed it)
                record.pinned = await asyncio.to_thread(partial(
                    self.store.put, record, replace=replace, guard=self._rows_allow(self._name_row_guards, adapter_id)))
            except BaseException:
                if created:
                    self.blobs.remove(digest)
                await asyncio.to_thread(self._release_shared, digest)
                raise
            entry = self._new_entry(record)
            self.tiers.admit_cpu(entry, weights)
            self._entries[adapter_id] = entry
        log.info("adapter %s %s (%s, %d bytes)", entry.name, "replaced" if old else "registered",
                 record.kind, record.size_bytes)
        if old is not None:
            old.retired, old.pinned = True, False  # its pin (if any) passes to the new version
            self._retire_later(old)
        return entry

    async def delete(self, adapter_id: str) -> None:
        """Refuse new requests at once; return after in-flight ones ended and memory and files are freed."""
        entry = await _settled(self._delete_row(adapter_id))  # shielded, as a registration's commit
        if entry is None:
            log.info("adapter %s: its row, which did not read, deleted (its files stay in quarantine)", adapter_id)
            return
        log.info("adapter %s deleted; waiting for %d request(s) in flight", entry.name, entry.in_flight)
        await self._retire(entry)
        for callback in self.on_removed if adapter_id not in self._entries else ():  # unless re-registered meanwhile
            callback(adapter_id)

    async def _delete_row(self, adapter_id: str) -> AdapterEntry | None:
        """The entry whose row was deleted; None for a row that did not read (never served here)."""
        async with self._lock:
            unreadable = adapter_id not in self._entries and adapter_id in self.store.unreadable
            entry = None if unreadable else self.get(adapter_id)
            for guard in self._delete_guards:
                if (reason := guard(adapter_id)) is not None:
                    raise AdapterConflictError(reason)
            if entry is not None:
                del self._entries[adapter_id]  # hidden before any await: nothing new can start using it
            try:
                await asyncio.to_thread(self.store.delete, adapter_id, self._rows_allow(self._row_guards, adapter_id))
            except BaseException:
                if entry is not None:
                    self._entries[adapter_id] = entry
                raise
            self._stats.pop(adapter_id, None)
            return entry

    def _retire_later(self, entry: AdapterEntry) -> None:
        self._in_background(self._retire(entry))

    async def _retire(self, entry: AdapterEntry) -> None:
        entry.retired = True
        await entry.idle.wait()
        await self.tiers.drop(entry)
        async with self._lock:
            digest = entry.record.content_hash
            if all(e.record.content_hash != digest for e in self._entries.values()):
                await asyncio.to_thread(self.blobs.remove, digest)
                await asyncio.to_thread(self._release_shared, digest)

    def _release_shared(self, digest: str) -> None:
        """With a shared blob store: quarantine the shared copy when no row (of any replica) refers
        to it any more. Best effort: a failure leaves an orphan, never a row without its blob."""
        try:
            self.blobs.release(digest, self.store.refers_to)
        except Exception as exc:  # noqa: BLE001 - the delete is done; the shared copy stays
            log.warning("adapter files %s: cannot release the shared copy: %s", digest, exc)

    # ---- pin / load -----------------------------------------------------------------------------
    async def set_pinned(self, adapter_id: str, pinned: bool) -> AdapterEntry:
        entry = self._servable(adapter_id)
        if pinned:
            entry.in_flight += 1  # a delete racing this pin waits for it, then drops the entry
            entry.idle.clear()
            try:
                await self.tiers.pin(entry)
            finally:
                self._release(entry)
            if entry.retired:
                raise AdapterNotFoundError(f"the adapter {adapter_id!r} was deleted or replaced meanwhile")
        else:
            entry.pinned = False
            await self.tiers.released()
        try:
            await asyncio.to_thread(self.store.set_pinned, adapter_id, pinned)
        except BaseException:
            # not saved: memory goes back to what the store (and every other replica) holds
            entry.pinned = not pinned
            await self.tiers.released()
            raise
        return entry

    async def load(self, adapter_id: str) -> AdapterEntry:
        """Warm an adapter onto the device without serving a request."""
        entry = self._servable(adapter_id)
        entry.in_flight += 1  # not evictable while it loads
        entry.idle.clear()
        try:
            await self.tiers.to_device(entry)
        finally:
            self._release(entry)
        return entry

    # ---- leases ---------------------------------------------------------------------------------
    def _servable(self, adapter_id: str) -> AdapterEntry:
        entry = self.get(adapter_id)
        if entry.missing:
            raise AdapterUnavailableError(
                f"the adapter {adapter_id!r} cannot be served: its files are missing; register it again")
        return entry

    async def reserve(self, adapter_id: str) -> AdapterLease:
        """Count a request on the adapter's current version and hold its weights in CPU memory;
        the device slot is claimed later, when the request enters the batch."""
        entry = self._servable(adapter_id)
        entry.in_flight += 1  # before any await: the adapter cannot be evicted or freed under us
        entry.idle.clear()
        try:
            await self.tiers.to_cpu(entry)
        except BaseException:
            self._release(entry)
            raise
        entry.stats.requests += 1
        entry.stats.last_used = time.time()
        return AdapterLease(entry, self)

    async def acquire(self, adapter_id: str) -> AdapterLease:
        """``reserve`` and claim the device slot at once (fails with NoFreeSlotError when every
        slot stays busy for ``slot_wait_seconds``)."""
        lease = await self.reserve(adapter_id)
        try:
            await lease.claim_device()
        except BaseException:
            lease.release()
            raise
        return lease

    def _release(self, entry: AdapterEntry) -> None:
        entry.in_flight -= 1
        entry.stats.last_used = time.time()
        if entry.in_flight == 0:
            entry.idle.set()
            self._in_background(self.tiers.released())

    def _in_background(self, work) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def close(self, timeout: float = 10.0) -> None:
        """Let background frees finish (bounded: a request that never ends must not hang shutdown)."""
        if self._retiring:
            _, pending = await asyncio.wait(self._retiring, timeout=timeout)
            for task in pending:
                task.cancel()
        self.store.close()


async def _settled(work: Awaitable[T]) -> T:
    """``work``'s result; a cancellation of the caller does not stop ``work`` (it runs to its end,
    commit or clean-up, in a task of its own; a failure there is logged)."""
    task = asyncio.ensure_future(work)
    task.add_done_callback(_log_unretrieved)
    return await asyncio.shield(task)


def _log_unretrieved(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.debug("registry change ended with %r", task.exception())
