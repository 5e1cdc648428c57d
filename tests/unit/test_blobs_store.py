"""Content-addressed adapter files (BlobStore) and the registry rows (SqlAdapterStore, on SQLite and
PostgreSQL)."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path

import pytest

from adapters.blobs import BLOB_FILES, BlobStore, content_hash
from adapters.errors import AdapterConflictError
from adapters.peft_io import CONFIG_FILE, WEIGHTS_FILE
from adapters.store import AdapterRecord, SqlAdapterStore, SqliteAdapterStore


def adapter_folder(root: Path, name: str, config: bytes = b'{"peft_type": "LORA"}',
                   weights: bytes = b"weights") -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / CONFIG_FILE).write_bytes(config)
    (folder / WEIGHTS_FILE).write_bytes(weights)
    return folder


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


# ---- content_hash -------------------------------------------------------------------------------
def test_content_hash_is_stable_and_covers_both_files(tmp_path):
    a = adapter_folder(tmp_path, "a")
    same = adapter_folder(tmp_path, "same")
    assert content_hash(a) == content_hash(same) == content_hash(a)
    assert len(content_hash(a)) == 64 and int(content_hash(a), 16) >= 0
    other_weights = adapter_folder(tmp_path, "w", weights=b"weightz")
    other_config = adapter_folder(tmp_path, "c", config=b'{"peft_type": "IA3"}')
    assert len({content_hash(a), content_hash(other_weights), content_hash(other_config)}) == 3


def test_content_hash_has_no_ambiguity_at_the_seam(tmp_path):
    # moving bytes from the end of one file to the start of the other changes the hash
    one = adapter_folder(tmp_path, "one", config=b"{}ab", weights=b"cd")
    two = adapter_folder(tmp_path, "two", config=b"{}a", weights=b"bcd")
    assert content_hash(one) != content_hash(two)


def test_extra_files_do_not_change_the_hash(tmp_path):
    a = adapter_folder(tmp_path, "a")
    before = content_hash(a)
    (a / "README.md").write_text("notes")
    assert content_hash(a) == before


# ---- BlobStore.add ------------------------------------------------------------------------------
def test_add_copies_both_files_under_their_hash(tmp_path):
    blobs = BlobStore(tmp_path / "blobs")
    source = adapter_folder(tmp_path, "src")
    (source / "adapter_model.bin").write_bytes(b"pickle")  # never copied
    digest, created = blobs.add(source)
    assert created and digest == content_hash(source)
    assert blobs.exists(digest)
    assert sorted(p.name for p in blobs.path(digest).iterdir()) == sorted(BLOB_FILES)
    for name in BLOB_FILES:
        assert (blobs.path(digest) / name).read_bytes() == (source / name).read_bytes()
    assert blobs.size(digest) == sum((source / n).stat().st_size for n in BLOB_FILES)
    assert (source / CONFIG_FILE).exists()  # the caller keeps its folder


def test_add_deduplicates_identical_content(tmp_path):
    blobs = BlobStore(tmp_path / "blobs")
    first, created_first = blobs.add(adapter_folder(tmp_path, "one"))
    second, created_second = blobs.add(adapter_folder(tmp_path, "two"))
    assert first == second and created_first and not created_second
    assert tree(blobs.root) == {first, f"{first}/{CONFIG_FILE}", f"{first}/{WEIGHTS_FILE}"}  # no temp left
    third, created_third = blobs.add(adapter_folder(tmp_path, "three", weights=b"other"))
    assert third != first and created_third


def test_a_failed_add_leaves_nothing(tmp_path):
    blobs = BlobStore(tmp_path / "blobs")
    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    (incomplete / CONFIG_FILE).write_bytes(b"{}")  # weights missing
    with pytest.raises(FileNotFoundError):
        blobs.add(incomplete)
    assert tree(blobs.root) == set()


def test_remove(tmp_path):
    blobs = BlobStore(tmp_path / "blobs")
    digest, _ = blobs.add(adapter_folder(tmp_path, "a"))
    blobs.remove(digest)
    assert not blobs.exists(digest) and not blobs.path(digest).exists()
    blobs.remove(digest)  # removing twice is harmless


# ---- BlobStore.reconcile ------------------------------------------------------------------------
def test_reconcile_removes_temporaries_quarantines_unreferenced_blobs_and_reports_missing(tmp_path):
    blobs = BlobStore(tmp_path / "blobs")
    kept, _ = blobs.add(adapter_folder(tmp_path, "kept"))
    orphan, _ = blobs.add(adapter_folder(tmp_path, "orphan", weights=b"orphan"))
    crashed = blobs.root / ".tmp-0123456789abcdef"  # an add that crashed before its rename
    crashed.mkdir()
    (crashed / CONFIG_FILE).write_bytes(b"{}")
    (blobs.root / ".tmp-file").write_bytes(b"x")
    absent = "f" * 64
    missing = blobs.reconcile({kept, absent})
    assert missing == [absent]
    assert blobs.exists(kept)
    assert not blobs.path(orphan).exists() and not crashed.exists() and not (blobs.root / ".tmp-file").exists()
    assert {p.name for p in blobs.root.iterdir()} == {kept, "quarantine"}
    # the orphan is kept whole, not deleted: its row may be what was lost
    assert blobs.quarantined() == [orphan]
    assert (blobs.quarantine / orphan / WEIGHTS_FILE).read_bytes() == b"orphan"


def test_a_lost_database_quarantines_every_blob_and_restoring_it_brings_them_back(tmp_path):
    blobs = BlobStore(tmp_path / "blobs")
    digests = {blobs.add(adapter_folder(tmp_path, name, weights=name.encode()))[0] for name in ("a", "b", "c")}
    assert blobs.reconcile(set()) == []  # the database is gone (or an older one lists none of them)
    assert blobs.quarantined() == sorted(digests) and not any(blobs.exists(d) for d in digests)
    assert blobs.reconcile(set()) == [] and blobs.quarantined() == sorted(digests)  # stable across starts
    assert blobs.reconcile(digests) == []  # the right database is back
    assert all(blobs.exists(d) for d in digests) and blobs.quarantined() == []
    assert {blobs.path(d).joinpath(WEIGHTS_FILE).read_bytes() for d in digests} == {b"a", b"b", b"c"}


def test_a_blob_quarantined_twice_keeps_one_whole_copy(tmp_path):
    blobs = BlobStore(tmp_path / "blobs")
    digest, _ = blobs.add(adapter_folder(tmp_path, "a"))
    blobs.reconcile(set())
    assert blobs.add(adapter_folder(tmp_path, "a2")) == (digest, True)  # uploaded again, then lost again
    blobs.reconcile(set())
    assert blobs.quarantined() == [digest] and not blobs.path(digest).exists()
    assert all((blobs.quarantine / digest / name).is_file() for name in (CONFIG_FILE, WEIGHTS_FILE))


def test_reconcile_reports_a_blob_with_a_lost_file_as_missing(tmp_path):
    blobs = BlobStore(tmp_path / "blobs")
    digest, _ = blobs.add(adapter_folder(tmp_path, "a"))
    (blobs.path(digest) / WEIGHTS_FILE).unlink()
    assert blobs.reconcile({digest}) == [digest]


def test_reconcile_never_removes_what_the_store_did_not_create(tmp_path):
    """The blob root may be a folder an operator also uses (e.g. --adapters-dir ./data/adapters):
    only hash-named folders and temporaries are the store's to delete."""
    blobs = BlobStore(tmp_path / "blobs")
    digest, _ = blobs.add(adapter_folder(tmp_path, "a"))
    foreign = adapter_folder(blobs.root, "my-adapter")
    (blobs.root / "notes.txt").write_text("keep me")
    assert blobs.reconcile(set()) == []
    assert not blobs.path(digest).exists() and blobs.quarantined() == [digest]
    assert (foreign / WEIGHTS_FILE).exists() and (blobs.root / "notes.txt").exists()


# ---- SqliteAdapterStore -------------------------------------------------------------------------
def record(adapter_id: str, digest: str = "a" * 64, **overrides) -> AdapterRecord:
    values = dict(id=adapter_id, content_hash=digest, kind="lora", size_bytes=123, created=1700000000.5,
                  info={"kind": "lora", "rank": 4, "target_modules": ["q_proj", "v_proj"], "virtual_tokens": 0})
    return AdapterRecord(**{**values, **overrides})


@pytest.fixture
def open_store(store_backend):
    return lambda: store_backend.open(SqliteAdapterStore, SqlAdapterStore)


def test_sqlite_creates_the_parent_folder(tmp_path):
    path = tmp_path / "state" / "gateway.sqlite3"
    SqliteAdapterStore(path).close()
    assert path.is_file()


def test_store_rows_survive_a_reopen(open_store):
    store = open_store()
    assert store.load_all() == []
    store.put(record("b-adapter", "b" * 64))
    store.put(record("a-adapter", pinned=True))
    store.close()
    reopened = open_store()
    rows = reopened.load_all()
    assert [r.id for r in rows] == ["a-adapter", "b-adapter"]  # ordered by id
    assert rows[0] == record("a-adapter", pinned=True)  # every field, info included, round-trips
    assert rows[1] == record("b-adapter", "b" * 64)
    reopened.close()


def test_store_put_replaces_the_row_with_the_same_id_only_when_asked(open_store):
    store = open_store()
    assert store.put(record("x")) is False
    with pytest.raises(AdapterConflictError):  # taken meanwhile (another replica): never overwritten
        store.put(record("x", "d" * 64))
    assert store.put(record("x", "c" * 64, kind="ia3", size_bytes=9, info={"kind": "ia3"}), replace=True) is False
    store.close()
    store = open_store()
    assert store.load_all() == [record("x", "c" * 64, kind="ia3", size_bytes=9, info={"kind": "ia3"})]
    store.close()


def test_a_replace_keeps_the_rows_pin(open_store):
    """The pin is the row's: a replace built from a stale view (another replica pinned or
    unpinned meanwhile) does not undo it, and says what it is."""
    store = open_store()
    store.put(record("x"))
    store.set_pinned("x", True)
    assert store.put(record("x", "c" * 64, pinned=False), replace=True) is True
    store.set_pinned("x", False)
    assert store.put(record("x", "d" * 64, pinned=True), replace=True) is False
    assert store.put(record("new", pinned=False), replace=True) is False  # no row yet: inserted as given
    assert {r.id: r.pinned for r in store.load_all()} == {"new": False, "x": False}
    store.close()


def test_store_delete_and_set_pinned_persist(open_store):
    store = open_store()
    for name in ("one", "two", "three"):
        store.put(record(name))
    store.delete("two")
    store.delete("never-there")  # no error
    store.set_pinned("one", True)
    store.set_pinned("three", True)
    store.set_pinned("three", False)
    store.set_pinned("never-there", True)  # no row appears
    store.close()
    store = open_store()
    assert {r.id: r.pinned for r in store.load_all()} == {"one": True, "three": False}
    store.close()


def test_store_uses_wal_journal(tmp_path):
    path = tmp_path / "gateway.sqlite3"
    store = SqliteAdapterStore(path)
    store.put(record("x"))
    with closing(sqlite3.connect(path)) as other:  # WAL is a property of the database file
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert other.execute("SELECT id FROM registry_adapters").fetchall() == [("x",)]
    store.close()
