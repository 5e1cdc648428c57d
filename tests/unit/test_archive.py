"""Tests of adapters.archive: good uploads extract, hostile ones are refused and leave nothing."""

from __future__ import annotations

import gzip
import io
import shutil
import stat
import struct
import tarfile
import warnings
import zipfile
from pathlib import Path
from typing import Callable

import pytest

import adapters.archive as archive_module
from adapters.archive import ArchiveLimits, extract_adapter_archive
from adapters.errors import AdapterValidationError

CONFIG = b'{"peft_type": "LORA", "r": 8}'
MODEL = b"\x08\x00\x00\x00\x00\x00\x00\x00{}      "  # contents are not checked here
GOOD = {"adapter_config.json": CONFIG, "adapter_model.safetensors": MODEL}
SMALL = ArchiveLimits(max_members=16, max_member_bytes=1024 * 1024, max_total_bytes=2 * 1024 * 1024)


def make_zip(path: Path, members: dict[str, bytes], dirs: tuple[str, ...] = ()) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns on the duplicate-name case
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
            for d in dirs:
                zf.writestr(zipfile.ZipInfo(d), b"")
            for name, data in members.items():
                zf.writestr(name, data)
    return path


TarMember = tuple[tarfile.TarInfo, "io.BytesIO | None"]


def tar_file(name: str, data: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, io.BytesIO(data)


def make_tar(path: Path, members: list[TarMember], gz: bool = True) -> Path:
    with tarfile.open(path, "w:gz" if gz else "w") as tf:
        for info, data in members:
            tf.addfile(info, data)
    return path


def special(name: str, kind: bytes, linkname: str = "") -> TarMember:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info, None


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    d = tmp_path / "out"
    d.mkdir()
    return d


def assert_good(dest: Path) -> None:
    assert sorted(p.name for p in dest.iterdir()) == sorted(GOOD)
    for name, data in GOOD.items():
        assert (dest / name).read_bytes() == data
        assert stat.S_IMODE((dest / name).stat().st_mode) == 0o600


def test_good_zip_at_root(tmp_path: Path, dest: Path) -> None:
    extract_adapter_archive(make_zip(tmp_path / "a.zip", GOOD), dest, ArchiveLimits())
    assert_good(dest)


def test_good_zip_inside_one_folder_with_readme(tmp_path: Path, dest: Path) -> None:
    members = {f"my-adapter/{k}": v for k, v in GOOD.items()}
    members["my-adapter/README.md"] = b"# notes"
    extract_adapter_archive(make_zip(tmp_path / "a.zip", members, dirs=("my-adapter/",)), dest, ArchiveLimits())
    assert_good(dest)  # README.md is tolerated but not extracted


def test_good_tar_gz_with_dot_prefix_and_folder(tmp_path: Path, dest: Path) -> None:
    folder = tarfile.TarInfo("./my-adapter")
    folder.type = tarfile.DIRTYPE
    members = [(folder, None)] + [tar_file(f"./my-adapter/{k}", v) for k, v in GOOD.items()]
    extract_adapter_archive(make_tar(tmp_path / "a.tar.gz", members), dest, ArchiveLimits())
    assert_good(dest)


def test_plain_tar_detected_by_magic_not_name(tmp_path: Path, dest: Path) -> None:
    path = make_tar(tmp_path / "upload.zip", [tar_file(k, v) for k, v in GOOD.items()], gz=False)
    extract_adapter_archive(path, dest, ArchiveLimits())
    assert_good(dest)


def test_dest_dir_must_be_empty(tmp_path: Path, dest: Path) -> None:
    (dest / "x").write_bytes(b"")
    with pytest.raises(ValueError):
        extract_adapter_archive(make_zip(tmp_path / "a.zip", GOOD), dest, ArchiveLimits())


def patch_zip(path: Path, header_sig: bytes, offset: int, fmt: str, value: int) -> None:
    """Overwrite one field in every local (PK\\3\\4) or central (PK\\1\\2) header."""
    raw = bytearray(path.read_bytes())
    at = raw.find(header_sig)
    while at != -1:
        struct.pack_into(fmt, raw, at + offset, value)
        at = raw.find(header_sig, at + 4)
    path.write_bytes(bytes(raw))


def zip_symlink(path: Path) -> Path:
    make_zip(path, {"adapter_model.safetensors": MODEL})
    with zipfile.ZipFile(path, "a") as zf:
        info = zipfile.ZipInfo("adapter_config.json")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, b"/etc/passwd")
    return path


def zip_encrypted(path: Path) -> Path:
    make_zip(path, GOOD)
    patch_zip(path, b"PK\x01\x02", 8, "<H", 0x1)  # general-purpose flag: bit 0 = encrypted
    return path


def zip_lying_size(path: Path) -> Path:
    """Central directory and local header declare 100 bytes; the stream inflates to 5 MiB."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("adapter_config.json", CONFIG)
        zf.writestr("adapter_model.safetensors", bytes(5 * 1024 * 1024))
    raw = bytearray(path.read_bytes())
    for sig, off in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        at = raw.rfind(sig)  # the last header of each kind is the model's
        struct.pack_into("<I", raw, at + off, 100)
    path.write_bytes(bytes(raw))
    return path


def zip_duplicate(path: Path) -> Path:
    make_zip(path, GOOD)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Duplicate name" is exactly what this builds
        with zipfile.ZipFile(path, "a") as zf:
            zf.writestr("adapter_config.json", b"{}")
    return path


Builder = Callable[[Path], Path]


def zip_of(members: dict[str, bytes]) -> Builder:
    return lambda p: make_zip(p, members)


def good_zip_plus(name: str, data: bytes = b"1") -> Builder:
    return zip_of({**GOOD, name: data})


def tar_of(*members: Callable[[], TarMember], good: bool = True) -> Builder:
    # Members are built lazily: a BytesIO can only be consumed once.
    def build(path: Path) -> Path:
        base = [tar_file(k, v) for k, v in GOOD.items()] if good else []
        return make_tar(path, base + [m() for m in members])

    return build


def raw(content: Callable[[Path], bytes]) -> Builder:
    return lambda p: (p.write_bytes(content(p)), p)[1]


MiB = 1024 * 1024
REFUSED: dict[str, tuple[Builder, str]] = {
    "zip dotdot": (good_zip_plus("../x"), "'..'"),
    "zip dotdot in folder": (zip_of({f"a/../{k}": v for k, v in GOOD.items()}), "'..'"),
    "zip absolute": (zip_of({"/adapter_config.json": CONFIG, "adapter_model.safetensors": MODEL}), "absolute"),
    "zip backslash": (good_zip_plus("a\\b"), "backslash"),
    "zip symlink": (zip_symlink, "symlink"),
    "zip encrypted": (zip_encrypted, "encrypted"),
    "zip pickle": (good_zip_plus("adapter_model.bin", b"\x80\x04."), "pickle"),
    "zip pt pickle": (good_zip_plus("extra.PT", b"\x80\x04."), "pickle"),
    "zip too many": (zip_of({**GOOD, **{f"README.md{i}": b"" for i in range(20)}}), "more than 16"),
    "zip declared too big": (good_zip_plus("README.md", bytes(5 * MiB)), "per-member limit"),
    "zip lying size": (zip_lying_size, "corrupt"),
    "zip missing config": (zip_of({"adapter_model.safetensors": MODEL}), "missing adapter_config.json"),
    "zip unknown file": (good_zip_plus("run.sh", b"rm -rf /"), "not an expected"),
    "zip duplicate": (zip_duplicate, "more than once"),
    "zip mixed layout": (good_zip_plus("x/adapter_config.json", CONFIG), "mixes"),
    "zip two folders": (zip_of({"a/adapter_config.json": CONFIG, "b/adapter_model.safetensors": MODEL}), "folder"),
    "zip too deep": (zip_of({f"a/b/{k}": v for k, v in GOOD.items()}), "deeper"),
    "tar dotdot": (tar_of(lambda: tar_file("../x", b"1")), "'..'"),
    "tar absolute": (tar_of(lambda: tar_file("/tmp/adapter_config.json", CONFIG), good=False), "absolute"),
    "tar symlink": (tar_of(lambda: special("x", tarfile.SYMTYPE, "/etc/passwd")), "symlink"),
    "tar hardlink": (tar_of(lambda: special("x", tarfile.LNKTYPE, "/etc/passwd")), "hardlink"),
    "tar device": (tar_of(lambda: special("x", tarfile.CHRTYPE)), "device"),
    "tar fifo": (tar_of(lambda: special("x", tarfile.FIFOTYPE)), "fifo"),
    "tar gz bomb": (tar_of(lambda: tar_file("README.md", bytes(8 * MiB))), "expands past"),
    "tar too many": (tar_of(*[lambda: tar_file("x", b"")] * 15), "more than 16"),
    "tar pickle": (tar_of(lambda: tar_file("adapter_model.bin", b"\x80")), "pickle"),
    "tar duplicate": (tar_of(lambda: tar_file("adapter_config.json", CONFIG)), "more than once"),
    "unknown format": (raw(lambda p: b"\x7fELF" + bytes(1000)), "not a zip"),
    "gzip without tar": (raw(lambda p: gzip.compress(bytes(2000))), "does not hold a tar"),
    "truncated zip": (raw(lambda p: make_zip(p, GOOD).read_bytes()[:60]), "corrupt"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refused_and_dest_left_empty(case: str, tmp_path: Path, dest: Path) -> None:
    build, expected = REFUSED[case]
    path = build(tmp_path / "upload")
    with pytest.raises(AdapterValidationError, match=expected):
        extract_adapter_archive(path, dest, SMALL)
    assert dest.is_dir() and list(dest.iterdir()) == []


def test_lying_zip_cleans_up_member_already_written(tmp_path: Path, dest: Path) -> None:
    # The config extracts fine before the model member fails: the config must be removed again.
    seen: list[list[str]] = []
    real_copy = archive_module._Budget.copy

    def spy(self, src, entry, target, written):  # type: ignore[no-untyped-def]
        seen.append(sorted(p.name for p in dest.iterdir()))
        return real_copy(self, src, entry, target, written)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(archive_module._Budget, "copy", spy)
        with pytest.raises(AdapterValidationError):
            extract_adapter_archive(zip_lying_size(tmp_path / "a.zip"), dest, SMALL)
    assert seen == [[], ["adapter_config.json"]]
    assert list(dest.iterdir()) == []


def zip_with_comments(path: Path) -> Path:
    """Three members with long per-entry comments: a 120 KB central directory for 3 members."""
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in {**GOOD, "README.md": b""}.items():
            info = zipfile.ZipInfo(name)
            info.comment = b"c" * 40000
            zf.writestr(info, data)
    return path


def zip64_claiming(path: Path, entries: int) -> Path:
    """A good zip whose end record defers to a ZIP64 record (as zipfile reads them) claiming ``entries``."""
    raw = bytearray(make_zip(path, GOOD).read_bytes())
    end = raw.rfind(b"PK\x05\x06")
    _, _, _, _, _, size, offset, _ = struct.unpack("<4s4H2LH", raw[end:end + 22])
    record = struct.pack("<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, entries, entries, size, offset)
    locator = struct.pack("<4sLQL", b"PK\x06\x07", 0, end, 1)
    struct.pack_into("<2H", raw, end + 8, 0xFFFF, 0xFFFF)
    path.write_bytes(bytes(raw[:end]) + record + locator + bytes(raw[end:]))
    return path


def test_zip64_end_record_within_limits_extracts(tmp_path: Path, dest: Path) -> None:
    extract_adapter_archive(zip64_claiming(tmp_path / "a.zip", 2), dest, SMALL)
    assert_good(dest)


def tar_with_long_name(path: Path, fmt: int) -> Path:
    """A 100 KB member name: tarfile would read its pax / GNU long-name entry whole into memory."""
    with tarfile.open(path, "w:gz", format=fmt) as tf:
        for name, data in GOOD.items():
            tf.addfile(*tar_file(name, data))
        tf.addfile(*tar_file("x" * 100_000, b""))
    return path


# zipfile parses the whole central directory, and tarfile reads each metadata entry whole, before
# we see a member: both libraries must never be reached with an archive over the limits.
@pytest.mark.parametrize("library,opener,build,expected", [
    ("zipfile", "ZipFile", zip_of({**GOOD, **{f"README.md{i}": b"" for i in range(20)}}), "more than 16 members"),
    ("zipfile", "ZipFile", zip_with_comments, "central directory"),
    ("zipfile", "ZipFile", lambda p: zip64_claiming(p, 10**9), "more than 16 members"),
    ("tarfile", "open", tar_of(*[lambda: tar_file("README.md", b"")] * 30), "more than 16 members"),
    ("tarfile", "open", lambda p: tar_with_long_name(p, tarfile.PAX_FORMAT), "metadata entry of"),
    ("tarfile", "open", lambda p: tar_with_long_name(p, tarfile.GNU_FORMAT), "metadata entry of"),
])
def test_archive_bounded_before_the_library_reads_it(library, opener, build, expected, tmp_path: Path,
                                                     dest: Path) -> None:
    path = build(tmp_path / "upload")

    def never(*_args, **_kwargs):
        raise AssertionError(f"{library}.{opener} reached with an archive over the limits")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(getattr(archive_module, library), opener, never)
        with pytest.raises(AdapterValidationError, match=expected):
            extract_adapter_archive(path, dest, SMALL)
    assert list(dest.iterdir()) == []


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_tar_formats_with_metadata_entries_extract(fmt: int, tmp_path: Path, dest: Path) -> None:
    with tarfile.open(tmp_path / "a.tar", "w", format=fmt) as tf:
        folder = "adapt\u00e9r-" + "long" * 30 if fmt != tarfile.USTAR_FORMAT else "adapter"  # pax / GNU long names
        for name, data in GOOD.items():
            info, stream = tar_file(f"{folder}/{name}", data)
            info.mtime, info.uname = 1.5, "\u00fcser"  # a fractional mtime and a non-ASCII owner add pax records
            tf.addfile(info, stream)
    extract_adapter_archive(tmp_path / "a.tar", dest, SMALL)
    assert_good(dest)


def test_message_never_echoes_contents(tmp_path: Path, dest: Path) -> None:
    path = make_zip(tmp_path / "a.zip", {**GOOD, "notes.txt": b"SECRET-TOKEN"})
    with pytest.raises(AdapterValidationError) as err:
        extract_adapter_archive(path, dest, SMALL)
    assert "notes.txt" in str(err.value) and "SECRET" not in str(err.value)


# ---- the config member is bounded by the config limit, not by the weights limit -------------------
CONFIG_LIMIT = archive_module.MAX_CONFIG_BYTES


def config_bomb_zip(path: Path) -> Path:
    """A few KB that declare (truthfully) a 5 MiB adapter_config.json: under the weights limit."""
    return make_zip(path, {"adapter_config.json": b" " * (5 * MiB), "adapter_model.safetensors": MODEL})


def config_bomb_tgz(path: Path) -> Path:
    members = [tar_file("adapter_config.json", b" " * (5 * MiB)), tar_file("adapter_model.safetensors", MODEL)]
    return make_tar(path, members)


def zip_lying_config(path: Path) -> Path:
    """Both headers of the config declare 100 bytes; its stream inflates to 5 MiB."""
    make_zip(path, {"adapter_config.json": b" " * (5 * MiB), "adapter_model.safetensors": MODEL})
    raw = bytearray(path.read_bytes())
    for sig, off in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        struct.pack_into("<I", raw, raw.find(sig) + off, 100)  # the first header of each kind is the config's
    path.write_bytes(bytes(raw))
    return path


def peak_config_on_disk(path: Path, dest: Path, limits: ArchiveLimits) -> tuple[str, int]:
    """Extract ``path`` (expected to be refused); the refusal message and the largest size the
    extracted config reached on disk, sampled before every read from the archive."""
    peak = [0]
    real_read = archive_module._read

    def spy(src, name, *args):  # type: ignore[no-untyped-def]
        target = dest / "adapter_config.json"
        peak[0] = max(peak[0], target.stat().st_size if target.exists() else 0)
        return real_read(src, name, *args)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(archive_module, "_read", spy)
        with pytest.raises(AdapterValidationError) as err:
            extract_adapter_archive(path, dest, limits)
    assert list(dest.iterdir()) == []
    return str(err.value), peak[0]


@pytest.mark.parametrize("build,expected", [
    (config_bomb_zip, f"over the adapter_config.json limit of {CONFIG_LIMIT} bytes"),
    (config_bomb_tgz, f"over the adapter_config.json limit of {CONFIG_LIMIT} bytes"),
    (zip_lying_config, "corrupt"),  # zipfile stops at the declared 100 bytes, then fails the CRC
])
def test_config_member_refused_before_writing_past_its_limit(build, expected, tmp_path: Path, dest: Path) -> None:
    # The defaults, as the gateway builds them: weights may reach 512 MiB, the config only 64 KiB.
    message, peak = peak_config_on_disk(build(tmp_path / "upload"), dest, ArchiveLimits())
    assert expected in message
    assert peak <= CONFIG_LIMIT


def test_config_streamed_past_its_limit_stops_there(tmp_path: Path, dest: Path) -> None:
    # The streaming check, should a reader ever yield more than the header allowed: nothing past the
    # limit is written, and no more than one byte past it is even inflated.
    src = io.BytesIO(b" " * (5 * MiB))
    name = "adapter_config.json"
    entry = archive_module._Entry(name, (name,), False, 5 * MiB, zipfile.ZipInfo(name))
    written: list[Path] = []
    with pytest.raises(AdapterValidationError, match=f"expands past the adapter_config.json limit of {CONFIG_LIMIT}"):
        archive_module._Budget(ArchiveLimits()).copy(src, entry, dest / "adapter_config.json", written)
    assert (dest / "adapter_config.json").stat().st_size <= CONFIG_LIMIT
    assert src.tell() <= CONFIG_LIMIT + 1


def test_config_at_its_limit_and_large_weights_extract(tmp_path: Path, dest: Path) -> None:
    members = {"adapter_config.json": CONFIG, "adapter_model.safetensors": bytes(3 * CONFIG_LIMIT)}
    limits = ArchiveLimits(max_config_bytes=len(CONFIG))
    extract_adapter_archive(make_zip(tmp_path / "a.zip", members), dest, limits)
    assert (dest / "adapter_config.json").read_bytes() == CONFIG
    assert (dest / "adapter_model.safetensors").stat().st_size == 3 * CONFIG_LIMIT
    over = ArchiveLimits(max_config_bytes=len(CONFIG) - 1)
    tgz = make_tar(tmp_path / "b.tgz", [tar_file(k, v) for k, v in members.items()])
    for path in (make_zip(tmp_path / "b.zip", members), tgz):
        shutil.rmtree(dest)
        dest.mkdir()
        with pytest.raises(AdapterValidationError, match="adapter_config.json limit"):
            extract_adapter_archive(path, dest, over)
        assert list(dest.iterdir()) == []
