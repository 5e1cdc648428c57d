"""AdapterRegistry on a tiny random Llama with the real runtime and PEFT files: register, replace
and delete with leases in flight, guards, pins, and a restart on the same data folder."""

from __future__ import annotations

import asyncio
import logging
import threading
import re
import shutil
from pathlib import Path

import pytest
import torch

from adapters.blobs import BlobStore, content_hash
from adapters.errors import (
    AdapterConflictError, AdapterNotFoundError, AdapterUnavailableError, AdapterValidationError,
)
from adapters.kinds.base import AdapterKind, AdapterLimits
from adapters.peft_io import CONFIG_FILE, WEIGHTS_FILE, read_adapter
from adapters.registry import AdapterRegistry
from adapters.runtime import AdapterRuntime
from adapters.store import SqliteAdapterStore
from adapters.tiers import NoFreeSlotError
from support import build_tiny_llama, make_peft_adapter

VOCAB = 320


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """PEFT folders: two LoRAs (different weights), one IA3, one prompt tuning."""
    root = tmp_path_factory.mktemp("sources")
    base = build_tiny_llama(VOCAB)
    specs = {"lora1": ("lora", 1), "lora2": ("lora", 2), "ia3": ("ia3", 3), "prompt": ("prompt_tuning", 4)}
    for name, (kind, seed) in specs.items():
        make_peft_adapter(base, kind, root / name, seed=seed)
    return {name: root / name for name in specs}


class Harness:
    """A registry over a fresh tiny model; installs run inline (the app hops to the engine thread)."""

    def __init__(self, data_dir: Path, device_slots: int = 2, cpu_capacity: int = 4,
                 slot_wait_seconds: float = 10.0):
        self.runtime = AdapterRuntime(build_tiny_llama(VOCAB), device_slots, torch.float32)
        self.blobs = BlobStore(data_dir / "adapters")
        self.store = SqliteAdapterStore(data_dir / "gateway.sqlite3")
        self.removed: list[str] = []

        async def install(weights) -> int:
            return self.runtime.install(weights)

        async def uninstall(slot: int) -> None:
            self.runtime.uninstall(slot)

        self.registry = AdapterRegistry(
            store=self.store, blobs=self.blobs, read=self.read, install=install, uninstall=uninstall,
            device_slots=device_slots, cpu_capacity=cpu_capacity, slot_wait_seconds=slot_wait_seconds)
        self.registry.on_removed.append(self.removed.append)

    def read(self, folder: Path):
        return read_adapter(folder, self.runtime.base_info, AdapterLimits(), torch.float32)

    def blob_names(self) -> set[str]:
        return {p.name for p in self.blobs.root.iterdir() if p.name != "quarantine"}

    def installed_slots(self) -> set[int]:
        return {s for s in range(1, self.runtime.capacity) if self.runtime.kind_of(s) is not None}

    async def settle(self) -> None:
        """Wait for the registry's background work (retiring replaced versions, releases)."""
        for _ in range(100):
            pending = list(self.registry._retiring)  # noqa: SLF001 - no public way to await them
            if not pending:
                return
            await asyncio.gather(*pending)
        raise AssertionError("background work never settled")


def run(coro):
    return asyncio.run(coro)


async def until(condition, what: str) -> None:
    """Let other tasks and worker threads run until ``condition()`` holds."""
    for _ in range(5000):
        if condition():
            return
        await asyncio.sleep(0.001)
    raise AssertionError(f"never happened: {what}")


# ---- register -----------------------------------------------------------------------------------
def test_register_stores_files_and_row_then_serves(tmp_path, sources):
    async def main():
        h = Harness(tmp_path)
        entry = await h.registry.register("sql-lora", sources["lora1"])
        assert "sql-lora" in h.registry and h.registry.get("sql-lora") is entry
        digest = content_hash(sources["lora1"])
        assert h.blob_names() == {digest}
        info = entry.describe()
        assert info["id"] == "sql-lora" and info["kind"] == "lora" and info["rank"] == 4
        assert info["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
        assert info["content_hash"] == digest and info["size_bytes"] == h.blobs.size(digest)
        assert info["tier"] == "cpu" and info["pinned"] is False and info["in_flight"] == 0
        assert info["requests"] == 0 and info["last_used"] is None
        assert [r.id for r in h.store.load_all()] == ["sql-lora"]

        lease = await h.registry.acquire("sql-lora")
        assert lease.slot >= 1 and h.runtime.kind_of(lease.slot) is AdapterKind.LORA
        busy = entry.describe()
        assert busy["tier"] == "device" and busy["in_flight"] == 1 and busy["requests"] == 1
        assert isinstance(busy["last_used"], int)
        lease.release()
        lease.release()  # a second release is a no-op
        assert entry.in_flight == 0
        await h.settle()
        await h.registry.close()

    run(main())


def test_register_without_id_generates_one_and_prompt_tuning_counts_virtual_tokens(tmp_path, sources):
    async def main():
        h = Harness(tmp_path)
        entry = await h.registry.register(None, sources["prompt"])
        assert re.fullmatch(r"adapter-[0-9a-f]{12}", entry.id)
        assert entry.virtual_tokens == 5 and entry.describe()["num_virtual_tokens"] == 5
        assert "virtual_tokens" not in entry.describe()
        await h.registry.close()

    run(main())


def test_a_taken_id_is_a_conflict_and_stores_nothing(tmp_path, sources):
    async def main():
        h = Harness(tmp_path)
        await h.registry.register("x", sources["lora1"])
        for source in (sources["lora1"], sources["lora2"]):
            with pytest.raises(AdapterConflictError, match="already registered"):
                await h.registry.register("x", source)
        assert h.blob_names() == {content_hash(sources["lora1"])}
        assert h.registry.get("x").record.content_hash == content_hash(sources["lora1"])
        await h.registry.close()

    run(main())


@pytest.mark.parametrize("bad_id", ["-x", ".hidden", "a/b", "../x", "a b", "x" * 65, "caf\u00e9", "a\0b",
                                    "foo\n", "foo\r\n"])
def test_invalid_ids_are_refused(tmp_path, sources, bad_id):
    async def main():
        h = Harness(tmp_path)
        with pytest.raises(AdapterValidationError, match="adapter id"):
            await h.registry.register(bad_id, sources["lora1"])
        assert h.blob_names() == set() and h.store.load_all() == []
        await h.registry.close()

    run(main())


def test_a_name_guard_refuses_an_id(tmp_path, sources):
    async def main():
        h = Harness(tmp_path)
        h.registry.add_name_guard(lambda name: "'tiny' is the base model's name" if name == "tiny" else None)
        with pytest.raises(AdapterConflictError, match="base model's name"):
            await h.registry.register("tiny", sources["lora1"])
        assert "tiny" not in h.registry and h.blob_names() == set()
        await h.registry.register("tiny-2", sources["lora1"])  # other ids pass
        await h.registry.close()

    run(main())


def test_an_invalid_adapter_leaves_nothing(tmp_path, sources):
    async def main():
        h = Harness(tmp_path)
        bad = tmp_path / "bad"
        shutil.copytree(sources["lora1"], bad)
        (bad / CONFIG_FILE).write_text('{"peft_type": "LOHA"}')
        with pytest.raises(AdapterValidationError, match="LOHA"):
            await h.registry.register("bad", bad)
        assert "bad" not in h.registry and h.blob_names() == set() and h.store.load_all() == []
        await h.registry.close()

    run(main())


def test_a_replace_or_delete_cancelled_while_its_row_commits_stays_whole(tmp_path, sources):
    """A shutdown cancels a replace whose row write is slow (a long fsync): the write commits in
    its thread anyway. The new files were removed as if it had failed, and after a restart the
    adapter, acknowledged and served before, had no files at all (tier missing, 503)."""
    async def main():
        h = Harness(tmp_path)
        await h.registry.start()
        await h.registry.register("a", sources["lora1"])
        real_put, real_delete, writing, go_on = h.store.put, h.store.delete, threading.Event(), threading.Event()

        def slow(write):
            def call(*args, **kwargs):
                writing.set()
                assert go_on.wait(10)
                return write(*args, **kwargs)
            return call

        h.store.put, h.store.delete = slow(real_put), slow(real_delete)
        for change in (lambda: h.registry.register("a", sources["lora2"], replace=True),
                       lambda: h.registry.delete("a")):
            writing.clear(), go_on.clear()
            task = asyncio.ensure_future(change())
            while not writing.is_set():
                await asyncio.sleep(0.01)
            task.cancel()
            go_on.set()
            with pytest.raises(asyncio.CancelledError):
                await task
            await asyncio.sleep(0.2)  # the shielded commit ends
            rows = h.store.load_all()
            if rows:  # the replace committed: its files are there, and it is what is served
                assert rows[0].content_hash == h.registry.get("a").record.content_hash
                assert rows[0].content_hash in h.blob_names()
            else:  # the delete committed: the entry is gone too
                assert "a" not in h.registry
        await h.registry.close()

    run(main())


def test_stored_files_damaged_after_registration_are_a_503_not_the_clients_400(tmp_path, sources, caplog):
    async def main():
        h = Harness(tmp_path, cpu_capacity=1)
        await h.registry.start()
        digest = (await h.registry.register("x", sources["lora1"])).record.content_hash
        await h.registry.register("y", sources["lora2"])  # x leaves the one CPU place: read from disk next
        weights = h.blobs.path(digest) / WEIGHTS_FILE
        weights.write_bytes(weights.read_bytes()[:100])  # truncated on the server's disk
        with pytest.raises(AdapterUnavailableError, match="damaged or missing"):
            await h.registry.acquire("x")
        (await h.registry.acquire("y")).release()  # the others serve on
        await h.registry.close()

    with caplog.at_level(logging.ERROR, logger="adapters.registry"):
        run(main())
    assert any("cannot be read" in r.getMessage() for r in caplog.records)


def test_a_failed_row_write_removes_the_new_files(tmp_path, sources):
    async def main():
        h = Harness(tmp_path)

        def broken_put(record, replace=False, guard=None):
            raise OSError("disk full")

        h.store.put = broken_put
        with pytest.raises(OSError, match="disk full"):
            await h.registry.register("x", sources["lora1"])
        assert "x" not in h.registry and h.blob_names() == set()
        await h.registry.close()

    run(main())


# ---- replace ------------------------------------------------------------------------------------
def test_replace_keeps_leases_on_the_old_version_and_frees_it_after(tmp_path, sources):
    async def main():
        h = Harness(tmp_path)
        old = await h.registry.register("x", sources["lora1"])
        old_lease = await h.registry.acquire("x")
        new = await h.registry.register("x", sources["lora2"], replace=True)
        assert h.registry.get("x") is new and new is not old and old.retired
        old_hash, new_hash = content_hash(sources["lora1"]), content_hash(sources["lora2"])
        assert new.record.content_hash == new_hash
        assert [r.content_hash for r in h.store.load_all()] == [new_hash]

        new_lease = await h.registry.acquire("x")
        assert new_lease.entry is new and new_lease.slot != old_lease.slot
        for _ in range(10):  # the old version's retirement runs, and must wait for its lease
            await asyncio.sleep(0)
        # the old version still serves its request: its slot and files stay
        assert h.installed_slots() == {old_lease.slot, new_lease.slot} and old.slot == old_lease.slot
        assert h.blob_names() == {old_hash, new_hash}

        old_lease.release()
        await h.settle()
        assert old.slot is None and old.weights is None
        assert h.installed_slots() == {new_lease.slot}
        assert h.blob_names() == {new_hash}
        assert h.removed == []  # a replace is not a removal of the id
        new_lease.release()
        await h.registry.close()

    run(main())


def test_replace_with_the_same_content_keeps_the_shared_files(tmp_path, sources):
    async def main():
        h = Harness(tmp_path)
        first = await h.registry.register("x", sources["lora1"])
        second = await h.registry.register("x", sources["lora1"], replace=True)
        await h.settle()
        assert second.record.content_hash == first.record.content_hash
        assert h.blob_names() == {first.record.content_hash}
        lease = await h.registry.acquire("x")  # still servable from the shared files
        lease.release()
        await h.registry.close()

    run(main())


def test_a_pin_passes_to_the_new_version(tmp_path, sources):
    async def main():
        h = Harness(tmp_path)
        old = await h.registry.register("x", sources["lora1"])
        await h.registry.set_pinned("x", True)
        assert old.pinned and old.slot is not None
        new = await h.registry.register("x", sources["lora2"], replace=True)
        await h.settle()
        assert new.pinned and new.slot is not None and not old.pinned and old.slot is None
        assert [r.pinned for r in h.store.load_all()] == [True]
        await h.registry.close()

    run(main())


def test_a_replace_whose_pin_cannot_come_back_now_still_succeeds(tmp_path, sources):
    """The new version of a pinned adapter cannot go to the device (out of device memory, a
    RuntimeError): the replace is committed and served, so it returns; the entry shows unpinned,
    the row keeps the pin for the next start."""
    async def main():
        h = Harness(tmp_path)
        await h.registry.register("x", sources["lora1"])
        await h.registry.set_pinned("x", True)
        install = h.registry.tiers._install

        async def out_of_memory(weights):
            raise RuntimeError("CUDA out of memory (simulated)")

        h.registry.tiers._install = out_of_memory
        new = await h.registry.register("x", sources["lora2"], replace=True)
        h.registry.tiers._install = install
        assert h.registry.get("x") is new and not new.pinned
        assert [(r.content_hash, r.pinned) for r in h.store.load_all()] == [(new.record.content_hash, True)]
        await h.settle()
        await h.registry.close()

    run(main())


# ---- delete -------------------------------------------------------------------------------------
def test_delete_hides_the_id_at_once_and_frees_after_the_last_request(tmp_path, sources):
    async def main():
        h = Harness(tmp_path)
        await h.registry.register("x", sources["lora1"])
        lease = await h.registry.acquire("x")
        deleting = asyncio.create_task(h.registry.delete("x"))
        await until(lambda: "x" not in h.registry, "the id is hidden")
        # the row goes in a worker thread: on a busy machine that can outlast a few loop turns
        await until(lambda: h.store.load_all() == [], "its row is deleted")
        for _ in range(10):
            await asyncio.sleep(0)
        assert not deleting.done()
        with pytest.raises(AdapterNotFoundError):
            await h.registry.acquire("x")
        assert h.installed_slots() == {lease.slot}  # the request in flight still runs on it
        assert h.removed == []
        lease.release()
        await deleting
        assert h.installed_slots() == set() and h.blob_names() == set()
        assert h.removed == ["x"]
        with pytest.raises(AdapterNotFoundError):
            await h.registry.delete("x")
        await h.registry.close()

    run(main())


def test_deleting_one_of_two_ids_with_the_same_content_keeps_the_files(tmp_path, sources):
    async def main():
        h = Harness(tmp_path)
        await h.registry.register("a", sources["lora1"])
        await h.registry.register("b", sources["lora1"])
        await h.registry.delete("a")
        assert h.blob_names() == {content_hash(sources["lora1"])}
        lease = await h.registry.acquire("b")
        lease.release()
        await h.registry.delete("b")
        assert h.blob_names() == set()
        await h.registry.close()

    run(main())


def test_a_delete_guard_refuses_with_its_reason(tmp_path, sources):
    async def main():
        h = Harness(tmp_path)
        await h.registry.register("x", sources["lora1"])
        h.registry.add_delete_guard(lambda i: "the experiment 'exp1' uses it" if i == "x" else None)
        with pytest.raises(AdapterConflictError, match="experiment 'exp1' uses it"):
            await h.registry.delete("x")
        assert "x" in h.registry and [r.id for r in h.store.load_all()] == ["x"]
        lease = await h.registry.acquire("x")  # untouched and still served
        lease.release()
        await h.registry.close()

    run(main())


# ---- pin / load ---------------------------------------------------------------------------------
def test_pin_holds_a_slot_until_unpinned(tmp_path, sources):
    async def main():
        h = Harness(tmp_path, device_slots=1, slot_wait_seconds=0.01)
        await h.registry.register("a", sources["lora1"])
        await h.registry.register("b", sources["ia3"])
        entry = await h.registry.set_pinned("a", True)
        assert entry.describe()["tier"] == "device" and entry.describe()["pinned"] is True
        with pytest.raises(NoFreeSlotError):
            await h.registry.acquire("b")
        assert h.registry.get("b").in_flight == 0  # the failed acquire gave its count back
        await h.registry.set_pinned("a", False)
        lease = await h.registry.acquire("b")
        assert h.registry.get("a").describe()["tier"] == "cpu"
        lease.release()
        await h.settle()
        assert [(r.id, r.pinned) for r in h.store.load_all()] == [("a", False), ("b", False)]
        await h.registry.close()

    run(main())


def test_load_warms_onto_the_device_without_a_request(tmp_path, sources):
    async def main():
        h = Harness(tmp_path)
        await h.registry.register("a", sources["lora1"])
        entry = await h.registry.load("a")
        await h.settle()
        assert entry.describe()["tier"] == "device" and entry.in_flight == 0 and entry.idle.is_set()
        await h.registry.close()

    run(main())


# ---- restart ------------------------------------------------------------------------------------
def test_a_restart_serves_the_same_adapters_and_restores_pins(tmp_path, sources):
    async def main():
        first = Harness(tmp_path)
        await first.registry.start()
        await first.registry.register("a", sources["lora1"])
        await first.registry.register("b", sources["ia3"])
        await first.registry.set_pinned("b", True)
        await first.registry.close()

        second = Harness(tmp_path)
        await second.registry.start()
        assert [e.id for e in second.registry.entries()] == ["a", "b"]
        a, b = second.registry.get("a"), second.registry.get("b")
        assert a.record.content_hash == content_hash(sources["lora1"])
        assert b.record.content_hash == content_hash(sources["ia3"])
        assert b.pinned and b.describe()["tier"] == "device"
        assert a.describe()["tier"] == "disk" and a.describe()["kind"] == "lora" and a.describe()["rank"] == 4
        lease = await second.registry.acquire("a")
        expected = second.read(sources["lora1"]).modules
        assert set(a.weights.modules) == set(expected)
        for name, module in expected.items():
            got = a.weights.modules[name]
            assert torch.equal(got.a, module.a) and torch.equal(got.b, module.b)
        lease.release()
        await second.registry.close()

    run(main())


def test_start_reports_missing_files_and_quarantines_orphans(tmp_path, sources, caplog):
    async def main():
        first = Harness(tmp_path)
        await first.registry.register("a", sources["lora1"])
        await first.registry.register("b", sources["ia3"])
        await first.registry.close()
        lost = content_hash(sources["lora1"])
        shutil.rmtree(first.blobs.path(lost))
        orphan_source = tmp_path / "orphan-src"
        shutil.copytree(sources["lora2"], orphan_source)
        orphan, _ = first.blobs.add(orphan_source)  # files no row refers to (a crash before the commit)
        (first.blobs.root / ".tmp-crashed").mkdir()

        second = Harness(tmp_path)
        await second.registry.start()
        assert second.blob_names() == {content_hash(sources["ia3"])}
        assert second.blobs.quarantined() == [orphan] and second.registry.quarantined_blobs == 1
        a = second.registry.get("a")
        assert a.missing and a.describe()["tier"] == "missing"
        assert "files (%s) are missing" % lost in caplog.text
        for call in (second.registry.acquire("a"), second.registry.load("a"), second.registry.set_pinned("a", True)):
            with pytest.raises(AdapterUnavailableError, match="files are missing"):
                await call
        assert a.in_flight == 0
        lease = await second.registry.acquire("b")  # the others still serve
        lease.release()
        # registering the files again repairs it
        repaired = await second.registry.register("a", sources["lora1"], replace=True)
        await second.settle()
        assert not repaired.missing and second.blobs.exists(lost)
        lease = await second.registry.acquire("a")
        lease.release()
        await second.registry.close()

    run(main())


def test_a_row_that_does_not_read_fails_alone_and_a_replace_repairs_it(tmp_path, sources, caplog):
    """A row edited by hand (or a newer release's) stops neither the start nor a resync: it is left
    out and logged once, its files are kept (quarantined, not deleted), the others serve; a
    resync keeps serving the version this process read last; a replace writes it whole again."""
    async def main():
        first = Harness(tmp_path)
        await first.registry.register("a", sources["lora1"])
        await first.registry.register("b", sources["ia3"])
        first.store.db.run(lambda tx: tx.execute("UPDATE registry_adapters SET info = ? WHERE id = ?",
                                                 ("{not json", "a")))
        await first.registry.sync()
        assert first.registry.get("a").record.content_hash == content_hash(sources["lora1"])  # served on
        await first.registry.close()

        caplog.clear()
        second = Harness(tmp_path)
        await second.registry.start()
        await second.registry.sync()
        assert [e.id for e in second.registry.entries()] == ["b"] and second.store.unreadable == {"a"}
        assert caplog.text.count("registry_adapters row 'a' does not read (JSONDecodeError") == 1
        assert second.blobs.quarantined() == [content_hash(sources["lora1"])]  # kept, not deleted
        lease = await second.registry.acquire("b")
        lease.release()
        with pytest.raises(AdapterConflictError, match="ask for replace"):
            await second.registry.register("a", sources["lora1"])
        await second.registry.register("a", sources["lora1"], replace=True)
        await second.settle()
        assert second.store.unreadable == set()
        lease = await second.registry.acquire("a")
        lease.release()

        second.store.db.run(lambda tx: tx.execute("UPDATE registry_adapters SET content_hash = ? WHERE id = ?",
                                                  ("../../elsewhere", "b")))
        await second.registry.sync()
        assert second.store.unreadable == {"b"} and "b" in second.registry  # served on as read last
        await second.registry.close()
        third = Harness(tmp_path)
        await third.registry.start()
        assert [e.id for e in third.registry.entries()] == ["a"]
        with pytest.raises(AdapterNotFoundError):
            await third.registry.delete("never-registered")
        await third.registry.delete("b")  # an unreadable row can be deleted through the API
        assert third.store.unreadable == set() and [r.id for r in third.store.load_all()] == ["a"]
        await third.registry.close()

    run(main())


def test_a_lost_database_loses_no_adapter_files_and_restoring_it_serves_them_again(tmp_path, sources):
    async def main():
        first = Harness(tmp_path)
        await first.registry.register("a", sources["lora1"])
        await first.registry.register("b", sources["prompt"])
        await first.registry.close()
        db = tmp_path / "gateway.sqlite3"
        saved = tmp_path / "backup"
        saved.mkdir()
        for path in tmp_path.glob("gateway.sqlite3*"):  # the database and its WAL
            path.rename(saved / path.name)

        empty = Harness(tmp_path)  # starts on a fresh, empty database
        await empty.registry.start()
        assert empty.registry.entries() == [] and empty.blob_names() == set()
        assert empty.registry.quarantined_blobs == 2  # kept, not deleted
        await empty.registry.close()

        for path in tmp_path.glob("gateway.sqlite3*"):
            path.unlink()
        for path in saved.iterdir():
            path.rename(tmp_path / path.name)
        assert db.exists()
        restored = Harness(tmp_path)
        await restored.registry.start()
        assert [e.id for e in restored.registry.entries()] == ["a", "b"]
        assert not any(e.missing for e in restored.registry.entries()) and restored.registry.quarantined_blobs == 0
        for adapter_id in ("a", "b"):
            lease = await restored.registry.acquire(adapter_id)
            lease.release()
        await restored.settle()
        await restored.registry.close()

    run(main())
