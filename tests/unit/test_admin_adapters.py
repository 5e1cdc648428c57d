"""The admin adapter routes end to end on a tiny random Llama, through TestClient: auth, uploads
(files, .zip, .tar.gz, server-side folders), every refusal leaving nothing behind, listing, pin /
unpin / load, delete, and the registry's Prometheus metrics."""

from __future__ import annotations

import io
import json
import shutil
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from transformers import LlamaForCausalLM

from adapters.blobs import content_hash
from adapters.peft_io import CONFIG_FILE, WEIGHTS_FILE
from gateway.app import create_app
from gateway.base_model import LoadedBase
from gateway.settings import Settings
from support import build_tiny_llama, build_tokenizer, make_peft_adapter

INFERENCE_KEY = "inference-key-0123456789"
MESSAGES = [{"role": "user", "content": "hello world, how are you?"}]
ERROR_FIELDS = {"message", "type", "param", "code"}
MiB = 1024 * 1024


# ---- fixtures -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Adapter folders: the served reference (in adapters_dir), others to upload, a LoRA of too high
    a rank, one for a deeper base, and the server-side source roots (with links pointing out)."""
    root = tmp_path_factory.mktemp("admin-files")
    vocab = len(build_tokenizer())
    base = build_tiny_llama(vocab)
    make_peft_adapter(base, "lora", root / "adapters" / "ref-lora", seed=1)
    make_peft_adapter(base, "lora", root / "lora2", seed=2)
    make_peft_adapter(base, "ia3", root / "ia3", seed=3)
    make_peft_adapter(base, "lora", root / "rank16", seed=4, r=16)
    deeper_config = build_tiny_llama(vocab).config
    deeper_config.num_hidden_layers = 3  # same shapes, one layer more than the served base
    make_peft_adapter(LlamaForCausalLM(deeper_config).eval(), "lora", root / "deeper", seed=5)
    roots, outside = root / "roots", root / "outside"
    shutil.copytree(root / "lora2", roots / "ok-lora")
    shutil.copytree(root / "ia3", outside / "secret-adapter")
    (roots / "link").symlink_to(outside / "secret-adapter", target_is_directory=True)
    (roots / "halflink").mkdir()
    shutil.copy(root / "ia3" / CONFIG_FILE, roots / "halflink" / CONFIG_FILE)
    (roots / "halflink" / WEIGHTS_FILE).symlink_to(outside / "secret-adapter" / WEIGHTS_FILE)
    return {"adapters_dir": root / "adapters", "ref": root / "adapters" / "ref-lora", "lora2": root / "lora2",
            "ia3": root / "ia3", "rank16": root / "rank16", "deeper": root / "deeper", "roots": roots,
            "outside": outside}


def make_base() -> LoadedBase:
    tokenizer = build_tokenizer()
    return LoadedBase(model=build_tiny_llama(len(tokenizer)), tokenizer=tokenizer, name="tiny",
                      device=torch.device("cpu"), dtype=torch.float32, context_window=256, load_seconds=0.0)


def settings_for(data_dir: Path, **overrides) -> Settings:
    values = dict(quantization="none", device="cpu", data_dir=data_dir, max_tokens_limit=64, default_max_tokens=8,
                  max_body_bytes=4096, max_device_adapters=2, max_lora_rank=8, max_adapter_bytes=MiB)
    return Settings(**{**values, **overrides})


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("admin-data")


@pytest.fixture(scope="module")
def client(files, data_dir):
    settings = settings_for(data_dir, adapters_dir=files["adapters_dir"], api_keys=[INFERENCE_KEY],
                            adapter_source_roots=[files["roots"]])
    with TestClient(create_app(settings, base=make_base())) as c:
        yield c


@pytest.fixture(scope="module")
def admin(client) -> dict[str, str]:
    return {"Authorization": f"Bearer {client.app.state.gateway.admin_key}"}


# ---- helpers ------------------------------------------------------------------------------------
def folder_files(folder: Path) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in (CONFIG_FILE, WEIGHTS_FILE)}


def upload(client, admin, files: dict[str, bytes], **fields):
    parts = [("file", (name, data, "application/octet-stream")) for name, data in files.items()]
    return client.post("/admin/adapters", headers=admin, files=parts, data=fields)


def upload_archive(client, admin, name: str, data: bytes, **fields):
    return upload(client, admin, {name: data}, **fields)


def zip_bytes(members: list[tuple[zipfile.ZipInfo | str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for info, data in members:
            archive.writestr(info, data)
    return buffer.getvalue()


def tgz_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def chat(client, model: str, **extra):
    body = {"model": model, "messages": MESSAGES, "temperature": 0, "max_tokens": 8, **extra}
    return client.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {INFERENCE_KEY}"})


def greedy_text(client, model: str) -> str:
    response = chat(client, model)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def check_error(response, status: int, *words: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_FIELDS
    for word in words:
        assert word.lower() in body["error"]["message"].lower(), body["error"]["message"]
    return body["error"]


def snapshot(client, admin, data_dir: Path) -> tuple:
    """What a refused registration must not change: stored files, staging, the listing."""
    stored = sorted(str(p.relative_to(data_dir)) for sub in ("adapter-store", "staging") if (data_dir / sub).exists()
                    for p in (data_dir / sub).rglob("*"))
    listing = client.get("/admin/adapters", headers=admin).json()["data"]
    return stored, sorted(item["id"] for item in listing)


def metric_samples(client) -> dict[tuple, float]:
    response = client.get("/metrics")
    assert response.status_code == 200
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


# ---- auth ---------------------------------------------------------------------------------------
ROUTES = [("post", "/admin/adapters"), ("get", "/admin/adapters"), ("get", "/admin/adapters/ref-lora"),
          ("delete", "/admin/adapters/ref-lora"), ("post", "/admin/adapters/ref-lora/pin"),
          ("post", "/admin/adapters/ref-lora/unpin"), ("post", "/admin/adapters/ref-lora/load")]


@pytest.mark.parametrize("method,path", ROUTES)
@pytest.mark.parametrize("authorization", [None, "Bearer wrong-admin-key-0000000", f"Bearer {INFERENCE_KEY}",
                                           "Basic abc"])
def test_every_admin_route_needs_the_admin_key(client, method, path, authorization):
    headers = {} if authorization is None else {"Authorization": authorization}
    response = client.request(method, path, headers=headers)
    error = check_error(response, 401, "admin key")
    assert error["type"] == "authentication_error"
    assert "ref-lora" in client.app.state.gateway.registry  # nothing happened


def test_admin_key_is_generated_owner_only_when_unset(client, admin, data_dir):
    key_file = data_dir / "admin_key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    key = key_file.read_text().strip()
    assert key == client.app.state.gateway.admin_key and len(key) >= 32
    assert client.get("/admin/adapters", headers={"Authorization": f"Bearer {key}"}).status_code == 200


@pytest.fixture(scope="module")
def plain_client(tmp_path_factory):
    """A second app: admin key configured, no server-side source roots, no inference keys."""
    data_dir = tmp_path_factory.mktemp("admin-plain")
    settings = settings_for(data_dir, admin_key="configured-admin-key-42")
    with TestClient(create_app(settings, base=make_base())) as c:
        yield c, data_dir


def test_a_configured_admin_key_is_used_and_no_file_is_written(plain_client):
    client, data_dir = plain_client
    assert not (data_dir / "admin_key").exists()
    assert client.get("/admin/adapters", headers={"Authorization": "Bearer configured-admin-key-42"}).status_code == 200
    check_error(client.get("/admin/adapters", headers={"Authorization": "Bearer gwadm-other"}), 401)


def test_server_folders_are_disabled_without_roots(plain_client, files):
    client, _ = plain_client
    response = client.post("/admin/adapters", json={"source_path": str(files["roots"] / "ok-lora")},
                           headers={"Authorization": "Bearer configured-admin-key-42"})
    check_error(response, 400, "disabled", "GATEWAY_ADAPTER_SOURCE_ROOTS")


# ---- registering by upload ----------------------------------------------------------------------
def test_uploads_serve_the_same_text_as_the_adapters_dir(client, admin, files):
    ref_files = folder_files(files["ref"])
    zipped = zip_bytes([(name, data) for name, data in ref_files.items()])
    tgz = tgz_bytes({f"ref-lora/{name}": data for name, data in ref_files.items()})  # one top folder is fine
    responses = {
        "up-files": upload(client, admin, ref_files, id="up-files"),
        "up-zip": upload_archive(client, admin, "adapter.zip", zipped, id="up-zip"),
        "up-tgz": upload_archive(client, admin, "adapter.tar.gz", tgz, id="up-tgz"),
    }
    expected_hash = content_hash(files["ref"])
    for adapter_id, response in responses.items():
        assert response.status_code == 201, response.text
        body = response.json()
        assert body["id"] == adapter_id and body["kind"] == "lora" and body["content_hash"] == expected_hash
    reference = greedy_text(client, "ref-lora")
    assert reference != greedy_text(client, "tiny")  # the adapter matters, so the comparison means something
    for adapter_id in responses:
        assert greedy_text(client, adapter_id) == reference


def test_client_file_names_only_pick_a_role_never_a_path(client, admin, files, data_dir, tmp_path):
    ref = folder_files(files["ref"])
    named = {"../../escape/" + CONFIG_FILE: ref[CONFIG_FILE], "C:\\evil\\" + WEIGHTS_FILE: ref[WEIGHTS_FILE]}
    response = upload(client, admin, named, id="odd-names")
    assert response.status_code == 201, response.text
    assert response.json()["content_hash"] == content_hash(files["ref"])
    assert not (data_dir.parent / "escape").exists() and not (data_dir / "escape").exists()


def test_register_without_id_generates_one(client, admin, files):
    response = upload(client, admin, folder_files(files["lora2"]))
    assert response.status_code == 201, response.text
    adapter_id = response.json()["id"]
    assert adapter_id.startswith("adapter-")
    assert chat(client, adapter_id).status_code == 200


def test_duplicate_id_conflicts_and_replace_installs_a_new_version(client, admin, files):
    first = upload(client, admin, folder_files(files["ref"]), id="dup-x")
    assert first.status_code == 201
    check_error(upload(client, admin, folder_files(files["lora2"]), id="dup-x"), 409, "already registered")
    assert client.get("/admin/adapters/dup-x", headers=admin).json()["content_hash"] == first.json()["content_hash"]
    replaced = upload(client, admin, folder_files(files["lora2"]), id="dup-x", replace="true")
    assert replaced.status_code == 201, replaced.text
    assert replaced.json()["content_hash"] == content_hash(files["lora2"]) != first.json()["content_hash"]
    assert client.get("/admin/adapters/dup-x", headers=admin).json()["content_hash"] == content_hash(files["lora2"])
    check_error(upload(client, admin, folder_files(files["lora2"]), id="dup-x", replace="maybe"), 400, "replace")


def bad_symlink_zip() -> bytes:
    link = zipfile.ZipInfo(WEIGHTS_FILE)
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    return zip_bytes([(CONFIG_FILE, b"{}"), (link, b"/etc/passwd")])


def corrupt_weights(files) -> dict[str, bytes]:
    return {CONFIG_FILE: (files["ref"] / CONFIG_FILE).read_bytes(), WEIGHTS_FILE: b"\xff" * 8 + b"{not json" * 10}


def hostile_config(raw_value: str, field: str = "lora_alpha"):
    """The reference LoRA with one config field set to a raw JSON token (Infinity, a deep array ...)."""
    def make(files) -> dict[str, bytes]:
        config = json.loads((files["ref"] / CONFIG_FILE).read_text())
        config[field] = "@@"
        text = json.dumps(config).replace('"@@"', raw_value)
        return {CONFIG_FILE: text.encode(), WEIGHTS_FILE: (files["ref"] / WEIGHTS_FILE).read_bytes()}
    return make


HOSTILE_CONFIGS = {  # each one escaped as a 500 (or stopped the start from --adapters-dir)
    "infinite-alpha": (hostile_config("Infinity"), ["lora_alpha", "finite"]),
    "nan-alpha": (hostile_config("NaN"), ["lora_alpha", "finite"]),
    "400-digit-alpha": (hostile_config("1" * 400), ["lora_alpha"]),
    "5000-digit-rank": (hostile_config("9" * 5000, "r"), ["'r'"]),
    "deep-config": (hostile_config("[" * 20000 + "]" * 20000, "revision"), ["deeper than"]),
    "targets-disagree": (hostile_config('["q_proj"]', "target_modules"), ["does not target"]),
    "backtracking-pattern": (hostile_config(json.dumps(r"(.*)\1"), "target_modules"), ["backreferences"]),
}

REFUSALS = {
    **{name: (make, {}, words) for name, (make, words) in HOSTILE_CONFIGS.items()},
    "pickle": (lambda f: {CONFIG_FILE: b"{}", "adapter_model.bin": b"\x80\x04pickle"}, {}, ["pickle"]),
    "dot-dot": (lambda f: {"a.zip": zip_bytes([("../" + CONFIG_FILE, b"{}"), (WEIGHTS_FILE, b"x")])}, {}, [".."]),
    "absolute": (lambda f: {"a.zip": zip_bytes([("/" + CONFIG_FILE, b"{}"), (WEIGHTS_FILE, b"x")])}, {},
                 ["absolute"]),
    "symlink": (lambda f: {"a.zip": bad_symlink_zip()}, {}, ["symlink"]),
    "zip-bomb": (lambda f: {"a.zip": zip_bytes([(CONFIG_FILE, b"{}"), (WEIGHTS_FILE, bytes(2 * MiB))])}, {},
                 ["limit"]),
    "tar-dot-dot": (lambda f: {"a.tar.gz": tgz_bytes({"../" + CONFIG_FILE: b"{}", WEIGHTS_FILE: b"x"})}, {},
                    [".."]),
    "corrupt-safetensors": (corrupt_weights, {}, ["safetensors"]),
    "rank": (lambda f: folder_files(f["rank16"]), {}, ["rank 16", "limit of 8"]),
    "missing-module": (lambda f: folder_files(f["deeper"]), {}, ["layers.2", "does not exist in the base"]),
    "non-slug-id": (lambda f: folder_files(f["ref"]), {"id": "not a slug/.."}, ["adapter id"]),
    "base-name": (lambda f: folder_files(f["ref"]), {"id": "tiny"}, ["base model"]),
    "stray-file": (lambda f: {CONFIG_FILE: b"{}", "notes.txt": b"hi"}, {}, ["unexpected file"]),
    "archive-and-files": (lambda f: {"a.zip": zip_bytes([(CONFIG_FILE, b"{}")]), CONFIG_FILE: b"{}"}, {},
                          ["either one archive"]),
    "not-an-archive": (lambda f: {"a.zip": b"just some text, not a zip"}, {}, ["not a zip"]),
    "weights-too-big": (lambda f: {CONFIG_FILE: b"{}", WEIGHTS_FILE: bytes(MiB + 1)}, {}, ["limit"]),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refused_uploads_leave_nothing_behind(client, admin, files, data_dir, case):
    make_files, fields, words = REFUSALS[case]
    before = snapshot(client, admin, data_dir)
    response = upload(client, admin, make_files(files), **fields)
    status = {"base-name": 409, "weights-too-big": 413}.get(case, 400)
    check_error(response, status, *words)
    assert snapshot(client, admin, data_dir) == before
    assert client.get("/readyz").status_code == 200


@pytest.mark.parametrize("content_type,body", [("text/plain", b"hello"), ("application/x-www-form-urlencoded", b"a=b"),
                                               ("", b"")])
def test_unknown_content_types_are_refused(client, admin, data_dir, content_type, body):
    before = snapshot(client, admin, data_dir)
    response = client.post("/admin/adapters", content=body, headers={**admin, "Content-Type": content_type})
    check_error(response, 400, "multipart/form-data")
    assert snapshot(client, admin, data_dir) == before


# ---- registering from a server-side folder ------------------------------------------------------
def test_a_folder_inside_a_root_registers(client, admin, files):
    relative = client.post("/admin/adapters", headers=admin, json={"source_path": "ok-lora", "id": "from-folder"})
    assert relative.status_code == 201, relative.text
    assert relative.json()["content_hash"] == content_hash(files["lora2"])
    absolute = client.post("/admin/adapters", headers=admin,
                           json={"source_path": str(files["roots"] / "ok-lora"), "id": "from-folder-abs"})
    assert absolute.status_code == 201, absolute.text
    assert greedy_text(client, "from-folder") == greedy_text(client, "from-folder-abs")
    assert (files["roots"] / "ok-lora" / WEIGHTS_FILE).exists()  # the operator's folder is left alone


@pytest.mark.parametrize("source,words", [
    ("ok-lora/../ok-lora", [".."]),
    ("OUTSIDE", ["not a folder inside"]),
    ("link", ["not a folder inside"]),
    ("ROOTS/link", ["not a folder inside"]),
    ("halflink", ["is a link"]),
    ("does-not-exist", ["not a folder inside"]),
    ("", ["empty"]),
])
def test_folders_outside_the_roots_are_refused(client, admin, files, data_dir, source, words):
    source = source.replace("OUTSIDE", str(files["outside"] / "secret-adapter")).replace("ROOTS", str(files["roots"]))
    before = snapshot(client, admin, data_dir)
    response = client.post("/admin/adapters", headers=admin, json={"source_path": source, "id": "sneaky"})
    message = check_error(response, 400, *words)["message"]
    assert "secret-adapter" not in message  # what lies outside is never revealed
    assert snapshot(client, admin, data_dir) == before


def test_unknown_json_fields_are_refused(client, admin):
    response = client.post("/admin/adapters", headers=admin, json={"source_path": "ok-lora", "path": "/etc"})
    check_error(response, 400, "path")


# ---- listing ------------------------------------------------------------------------------------
def test_list_and_get_describe_each_adapter(client, admin, files):
    assert chat(client, "ref-lora").status_code == 200
    listing = client.get("/admin/adapters", headers=admin)
    assert listing.status_code == 200 and listing.json()["object"] == "list"
    items = {item["id"]: item for item in listing.json()["data"]}
    one = client.get("/admin/adapters/ref-lora", headers=admin).json()
    assert items["ref-lora"]["content_hash"] == one["content_hash"]
    for field in ("kind", "rank", "target_modules", "size_bytes", "content_hash", "created", "tier", "pinned",
                  "in_flight", "requests", "last_used"):
        assert field in one, field
    assert one["kind"] == "lora" and one["rank"] == 4 and "q_proj" in one["target_modules"]
    assert one["size_bytes"] == sum((files["ref"] / n).stat().st_size for n in (CONFIG_FILE, WEIGHTS_FILE))
    assert one["content_hash"] == content_hash(files["ref"])
    assert isinstance(one["created"], int) and one["tier"] in ("device", "cpu", "disk")
    assert one["pinned"] is False and isinstance(one["in_flight"], int)
    assert one["requests"] >= 1 and isinstance(one["last_used"], int)
    check_error(client.get("/admin/adapters/no-such-adapter", headers=admin), 404, "no-such-adapter")


# ---- pin / unpin / load -------------------------------------------------------------------------
def test_pin_unpin_and_load_move_adapters_between_tiers(client, admin, files):
    for adapter_id in ("t-a", "t-b", "t-c"):
        assert upload(client, admin, folder_files(files["ia3"]), id=adapter_id).status_code == 201

    def tier(adapter_id):
        return client.get(f"/admin/adapters/{adapter_id}", headers=admin).json()["tier"]

    def post(adapter_id, action):
        response = client.post(f"/admin/adapters/{adapter_id}/{action}", headers=admin)
        assert response.status_code == 200, response.text
        return response.json()

    loaded = post("t-a", "load")
    assert loaded["tier"] == "device" and loaded["in_flight"] == 0 and loaded["requests"] == 0
    assert post("t-b", "load")["tier"] == "device"
    assert post("t-c", "load")["tier"] == "device"  # two device slots: t-a, the least recent, leaves
    assert tier("t-a") == "cpu" and tier("t-b") == "device"
    pinned = post("t-a", "pin")
    assert pinned["pinned"] is True and pinned["tier"] == "device"
    assert post("t-b", "pin")["pinned"] is True
    check_error(client.post("/admin/adapters/t-c/pin", headers=admin), 409, "pinned")
    assert tier("t-c") == "cpu" and tier("t-a") == "device" and tier("t-b") == "device"
    unpinned = post("t-a", "unpin")
    assert unpinned["pinned"] is False and unpinned["tier"] == "device"
    post("t-b", "unpin")
    assert post("t-c", "pin")["tier"] == "device"
    post("t-c", "unpin")
    assert not any(item["pinned"] for item in client.get("/admin/adapters", headers=admin).json()["data"])
    for action in ("pin", "unpin", "load"):
        check_error(client.post(f"/admin/adapters/no-such-adapter/{action}", headers=admin), 404)


# ---- delete -------------------------------------------------------------------------------------
def test_delete_removes_the_model_and_its_files(client, admin, files, data_dir):
    unique = {CONFIG_FILE: (files["ia3"] / CONFIG_FILE).read_bytes().replace(b"{", b'{"revision": null, ', 1),
              WEIGHTS_FILE: (files["ia3"] / WEIGHTS_FILE).read_bytes()}  # content no other id shares
    created = upload(client, admin, unique, id="del-me")
    assert created.status_code == 201, created.text
    blob = data_dir / "adapter-store" / created.json()["content_hash"]
    assert blob.is_dir()
    assert chat(client, "del-me").status_code == 200
    response = client.delete("/admin/adapters/del-me", headers=admin)
    assert response.status_code == 200 and response.json() == {"id": "del-me", "object": "adapter", "deleted": True}
    error = check_error(chat(client, "del-me"), 404)
    assert error["code"] == "model_not_found" and error["param"] == "model"
    check_error(client.get("/admin/adapters/del-me", headers=admin), 404)
    check_error(client.delete("/admin/adapters/del-me", headers=admin), 404)
    assert not blob.exists()
    models = client.get("/v1/models", headers={"Authorization": f"Bearer {INFERENCE_KEY}"}).json()["data"]
    assert "del-me" not in {card["id"] for card in models}


# ---- metrics ------------------------------------------------------------------------------------
def test_metrics_count_loads_evictions_and_residents(client, admin, files):
    for adapter_id in ("m-1", "m-2"):
        assert upload(client, admin, folder_files(files["lora2"]), id=adapter_id).status_code == 201
    for adapter_id in ("ref-lora", "m-1", "m-2", "ref-lora", "ref-lora"):  # three adapters, two device slots
        assert chat(client, adapter_id).status_code == 200
    check_error(chat(client, "no-such-model-q7"), 404)
    samples = metric_samples(client)
    # registered adapters start in the CPU tier (it holds them all here): loads are CPU -> device
    assert samples[("gateway_adapter_loads_total", (("source", "cpu"),))] >= 3
    assert samples[("gateway_adapter_evictions_total", (("tier", "device"),))] >= 2
    assert samples[("gateway_adapters_resident", (("tier", "device"),))] == 2
    assert ("gateway_adapters_resident", (("tier", "cpu"),)) in samples
    assert ("gateway_adapter_tier_lookups_total", (("result", "hit"), ("tier", "device"))) in samples
    assert "no-such-model-q7" not in client.get("/metrics").text
    assert samples[("gateway_lora_kernel", (("kernel", "torch"),))] == 1  # auto on CPU: the torch path


# ---- restart ------------------------------------------------------------------------------------
def test_hostile_configs_in_the_adapters_dir_are_skipped_and_the_rest_served(files, tmp_path):
    adapters_dir = tmp_path / "adapters"
    shutil.copytree(files["ref"], adapters_dir / "good")
    for name, (make, _) in HOSTILE_CONFIGS.items():
        (adapters_dir / name).mkdir(parents=True)
        for file_name, data in make(files).items():
            (adapters_dir / name / file_name).write_bytes(data)
    settings = settings_for(tmp_path / "data", adapters_dir=adapters_dir, admin_key="hostile-admin-key-42")
    with TestClient(create_app(settings, base=make_base())) as c:
        listed = c.get("/admin/adapters", headers={"Authorization": "Bearer hostile-admin-key-42"}).json()
        assert [a["id"] for a in listed["data"]] == ["good"]
        assert greedy_text(c, "good")


def test_a_restart_keeps_uploads_and_pins_and_repairs_lost_files_from_the_adapters_dir(files, tmp_path):
    """Uploaded adapters and pins survive a restart on the same data folder; an adapter whose stored
    files were lost is served again when --adapters-dir still holds it."""
    settings = settings_for(tmp_path / "data", adapters_dir=files["adapters_dir"], admin_key="restart-admin-key-42")
    admin = {"Authorization": "Bearer restart-admin-key-42"}
    with TestClient(create_app(settings, base=make_base())) as first:
        assert upload(first, admin, folder_files(files["ia3"]), id="kept").status_code == 201
        assert first.post("/admin/adapters/kept/pin", headers=admin).status_code == 200
        before = {"kept": greedy_text(first, "kept"), "ref-lora": greedy_text(first, "ref-lora")}
    shutil.rmtree(tmp_path / "data" / "adapter-store" / content_hash(files["ref"]))  # lost files
    with TestClient(create_app(settings, base=make_base())) as second:
        kept = second.get("/admin/adapters/kept", headers=admin).json()
        assert kept["pinned"] is True and kept["tier"] == "device"
        assert second.get("/admin/adapters/ref-lora", headers=admin).json()["tier"] != "missing"
        assert {name: greedy_text(second, name) for name in before} == before
