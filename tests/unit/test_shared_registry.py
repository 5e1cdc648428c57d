"""Two registries (two replicas: each its own tiny model, data dir and local adapter tier) over one
shared folder, on a tiny random Llama with real PEFT files. One SQLite file stands in for the shared
registry (PostgreSQL in a deployment): a row registered on A is served by B, which reads the files
through from the shared store."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from adapters.blobs import BlobStore, content_hash
from adapters.errors import AdapterConflictError, AdapterUnavailableError
from adapters.kinds.base import AdapterLimits
from adapters.peft_io import WEIGHTS_FILE, read_adapter
from adapters.registry import AdapterRegistry
from adapters.runtime import AdapterRuntime
from adapters.shared_blobs import LIVE, QUARANTINE, CachedBlobStore, SharedBlobs
from adapters.shared_store import SharedStore
from adapters.store import SqliteAdapterStore
from support import build_tiny_llama
from test_registry import VOCAB, run, sources  # noqa: F401 - sources: a fixture


class Replica:
    def __init__(self, tmp_path: Path, name: str):
        self.runtime = AdapterRuntime(build_tiny_llama(VOCAB), 2, torch.float32)
        (tmp_path / "shared").mkdir(exist_ok=True)
        self.blobs = CachedBlobStore(BlobStore(tmp_path / name / "adapter-store"),
                                     SharedBlobs(SharedStore(str(tmp_path / "shared"))))
        self.store = SqliteAdapterStore(tmp_path / "registry.sqlite3")

        async def install(weights) -> int:
            return self.runtime.install(weights)

        async def uninstall(slot: int) -> None:
            self.runtime.uninstall(slot)

        self.registry = AdapterRegistry(
            store=self.store, blobs=self.blobs,
            read=lambda folder: read_adapter(folder, self.runtime.base_info, AdapterLimits(), torch.float32),
            install=install, uninstall=uninstall, device_slots=2, cpu_capacity=4)

    async def settle(self) -> None:
        while self.registry._retiring:  # noqa: SLF001 - no public way to await them
            await asyncio.gather(*list(self.registry._retiring))  # noqa: SLF001


def test_registered_on_a_served_on_b_through_the_shared_store(tmp_path, sources):  # noqa: F811
    async def main():
        a, b = Replica(tmp_path, "a"), Replica(tmp_path, "b")
        await a.registry.start()
        entry = await a.registry.register("sql-lora", sources["lora1"])
        digest = entry.record.content_hash
        assert (tmp_path / "shared" / LIVE / digest / WEIGHTS_FILE).is_file()  # written through

        await b.registry.start()
        assert "sql-lora" in b.registry and not b.registry.get("sql-lora").missing
        assert not b.blobs.local.exists(digest)  # nothing fetched before first use
        lease = await b.registry.acquire("sql-lora")
        assert lease.slot >= 1 and b.blobs.fetches == 1 and b.blobs.local.exists(digest)
        lease.release()
        # B serves the very weights A registered
        ours, theirs = a.registry.read_weights("sql-lora"), b.registry.read_weights("sql-lora")
        assert ours.kind is theirs.kind and ours.describe() == theirs.describe()
        assert content_hash(b.blobs.path(digest)) == content_hash(sources["lora1"])
        assert b.blobs.fetches == 1  # read_weights was a cache hit
        for r in (a, b):
            await r.settle()
            await r.registry.close()

    run(main())


def test_a_corrupt_shared_blob_is_not_served_on_b(tmp_path, sources):  # noqa: F811
    async def main():
        a, b = Replica(tmp_path, "a"), Replica(tmp_path, "b")
        await a.registry.start()
        digest = (await a.registry.register("x", sources["lora1"])).record.content_hash
        weights = tmp_path / "shared" / LIVE / digest / WEIGHTS_FILE
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0x01  # one bit, inside the tensor data: still a well-formed safetensors file
        weights.write_bytes(bytes(data))
        await b.registry.start()
        try:
            await b.registry.acquire("x")
        except AdapterUnavailableError as exc:
            assert "corrupt" in str(exc)
        else:
            raise AssertionError("a corrupt shared blob was served")
        assert not b.blobs.local.exists(digest) and b.runtime.kind_of(1) is None
        lease = await a.registry.acquire("x")  # A still serves its own verified local copy
        lease.release()
        for r in (a, b):
            await r.settle()
            await r.registry.close()

    run(main())


def test_the_shared_blob_goes_to_quarantine_only_when_no_row_refers_to_it(tmp_path, sources):  # noqa: F811
    async def main():
        a, b = Replica(tmp_path, "a"), Replica(tmp_path, "b")
        await a.registry.start()
        await a.registry.register("one", sources["lora1"])
        digest = (await a.registry.register("two", sources["lora1"])).record.content_hash  # same content
        await a.registry.delete("one")
        await a.settle()
        assert a.blobs.shared.has(digest)  # "two" still refers to it
        assert a.blobs.local.exists(digest)
        await b.registry.start()
        (await b.registry.acquire("two")).release()  # b caches it
        await b.registry.delete("two")  # on the other replica: b's row view is the shared database
        await b.settle()
        assert not b.blobs.local.exists(digest)  # the local copy goes
        assert not a.blobs.shared.has(digest)  # no row left: out of service ...
        assert (tmp_path / "shared" / QUARANTINE / digest).is_dir()  # ... but kept, never deleted
        for r in (a, b):
            await r.registry.close()

    run(main())


def test_a_new_id_registered_on_both_replicas_at_once_is_one_registration_and_one_409(tmp_path, sources):  # noqa: F811
    """B has not heard of A's "x" yet (no change feed between these two): its own check passes,
    and the row it would write must not overwrite A's (both answered 201, one silently lost)."""
    async def main():
        a, b = Replica(tmp_path, "a"), Replica(tmp_path, "b")
        await a.registry.start()
        await b.registry.start()
        first = await a.registry.register("x", sources["lora1"])
        with pytest.raises(AdapterConflictError, match="already registered"):  # not an overwrite of A's
            await b.registry.register("x", sources["lora2"])
        assert [r.content_hash for r in b.store.load_all()] == [first.record.content_hash]
        assert "x" not in b.registry  # B serves nothing it did not commit
        for r in (a, b):
            await r.settle()
            await r.registry.close()

    run(main())


def test_a_replace_keeps_the_pin_another_replica_set_meanwhile(tmp_path, sources):  # noqa: F811
    async def main():
        a, b = Replica(tmp_path, "a"), Replica(tmp_path, "b")
        await a.registry.start()
        await a.registry.register("x", sources["lora1"])
        await b.registry.start()  # B knows "x", unpinned
        await a.registry.set_pinned("x", True)
        replaced = await b.registry.register("x", sources["lora2"], replace=True)
        assert replaced.pinned  # the acknowledged pin is not undone by B's stale view
        assert [r.pinned for r in a.store.load_all()] == [True]
        for r in (a, b):
            await r.settle()
            await r.registry.close()

    run(main())
