"""Two gateways (two ASGI apps on a tiny model) sharing one real PostgreSQL database and one data
folder (standing in for the shared file store): what one registers, replaces, deletes, pins or
experiments with reaches the other through LISTEN/NOTIFY (and the periodic resync heals a missed
notification); each training job runs once, and another replica resumes it when its claimer
stops; a console session started on one replica is good on the other and a sign-out on either
ends it; with PostgreSQL down, known adapters keep serving and admin writes (and console sessions)
answer 503."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import psycopg
import pytest
from fastapi.testclient import TestClient
from postgres_support import PostgresCluster, unavailable_reason
from support import build_tiny_llama, build_tokenizer, make_peft_adapter
from test_api import make_base, make_settings
from test_training_api import ADMIN, MESSAGES, jsonl, rows, submit

from gateway.app import create_app
from gateway.console.security import COOKIE_NAME, CSRF_HEADER
from gateway.training.store import SUCCEEDED

WAIT = 60.0  # generous bound on a condition that holds within a second when things work
TERMINAL = ("succeeded", "failed", "cancelled")


def poll(predicate, what: str):
    deadline = time.monotonic() + WAIT
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def adapters_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fleet-adapters")
    base = build_tiny_llama(len(build_tokenizer()))
    for seed, (name, kind) in enumerate((("lora-1", "lora"), ("lora-2", "lora"), ("ia3-1", "ia3")), start=1):
        make_peft_adapter(base, kind, root / name, seed=seed)
    return root


def make_gateway(data_dir: Path, url: str, adapters_root: Path, **overrides) -> TestClient:
    # leases long enough that a busy machine never lets one lapse while its holder lives
    values = dict(admin_key="k" * 24, max_body_bytes=65536, database_url=url, adapter_source_roots=[adapters_root],
                  database_resync_seconds=0.5, database_timeout_seconds=2, training_lease_seconds=30)
    settings = make_settings(data_dir, None, **{**values, **overrides})
    return TestClient(create_app(settings, base=make_base(build_tokenizer())))


@contextlib.contextmanager
def two_gateways(url: str, data_dir: Path, adapters_root: Path, **overrides):
    with make_gateway(data_dir, url, adapters_root, **overrides) as a, \
            make_gateway(data_dir, url, adapters_root, **overrides) as b:
        yield a, b


@pytest.fixture
def fleet(postgres_url, tmp_path, adapters_root):
    with two_gateways(postgres_url, tmp_path, adapters_root) as pair:
        yield pair


def register(client, adapter_id: str, folder: str, replace: bool = False):
    return client.post("/admin/adapters", headers=ADMIN,
                       json={"source_path": folder, "id": adapter_id, "replace": replace})


def chat(client, model: str, **extra):
    return client.post("/v1/chat/completions",
                       json={"model": model, "messages": MESSAGES, "max_tokens": 2, "temperature": 0, **extra})


def described(client, adapter_id: str) -> dict | None:
    response = client.get(f"/admin/adapters/{adapter_id}", headers=ADMIN)
    return response.json() if response.status_code == 200 else None


def gateway_of(client):
    return client.app.state.gateway


def job_view(client, job_id: str) -> dict:
    """The job as this replica shows it; {} while it does not know the job yet (404)."""
    response = client.get(f"/admin/training-jobs/{job_id}", headers=ADMIN)
    return response.json() if response.status_code == 200 else {}


# ---- adapters -------------------------------------------------------------------------------------
def test_register_replace_and_delete_reach_the_other_replica(fleet):
    a, b = fleet
    assert register(a, "shared", "lora-1").status_code == 201
    poll(lambda: chat(b, "shared").status_code == 200, "B serves what A registered")
    first = described(a, "shared")["content_hash"]
    assert described(b, "shared")["content_hash"] == first

    # a request in flight on B holds the old version while A replaces it
    registry_b = gateway_of(b).registry
    lease = b.portal.call(registry_b.reserve, "shared")
    assert register(a, "shared", "lora-2", replace=True).status_code == 201
    second = described(a, "shared")["content_hash"]
    assert second != first
    poll(lambda: described(b, "shared")["content_hash"] == second, "B serves the new version")
    assert lease.entry.record.content_hash == first and lease.entry.retired
    assert lease.entry.weights is not None  # still held for the request in flight
    assert chat(b, "shared").status_code == 200  # new requests: the new version
    b.portal.call(lease.release)
    poll(lambda: lease.entry.weights is None, "the old version is freed after its last request")

    assert a.delete("/admin/adapters/shared", headers=ADMIN).status_code == 200
    poll(lambda: chat(b, "shared").status_code == 404, "B refuses the deleted adapter")
    assert chat(b, "shared").json()["error"]["code"] == "model_not_found"


def test_pins_follow_and_a_missed_notification_heals(fleet, postgres_url):
    a, b = fleet
    assert register(a, "pinned", "ia3-1").status_code == 201
    assert a.post("/admin/adapters/pinned/pin", headers=ADMIN).status_code == 200
    poll(lambda: (described(b, "pinned") or {}).get("pinned") and described(b, "pinned")["tier"] == "device",
         "B pins it on its device too")
    # a change that sends no notification (as one lost while a listener reconnects): the resync finds it
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("DELETE FROM registry_adapters WHERE id = 'pinned'")
    for client in (a, b):
        poll(lambda c=client: chat(c, "pinned").status_code == 404, "the periodic resync applies the delete")


# ---- experiments ----------------------------------------------------------------------------------
def test_experiment_assignment_is_the_same_and_results_aggregate(fleet):
    a, b = fleet
    for adapter_id, folder in (("arm-lora", "lora-1"), ("arm-ia3", "ia3-1")):
        assert register(a, adapter_id, folder).status_code == 201
    poll(lambda: described(b, "arm-ia3") is not None, "B knows both arms")
    body = {"name": "shared-exp", "arms": [{"name": "arm-lora", "weight": 1}, {"name": "arm-ia3", "weight": 1}],
            "salt": "fixed"}
    assert a.post("/admin/experiments", json=body, headers=ADMIN).status_code == 201
    poll(lambda: b.get("/admin/experiments/shared-exp", headers=ADMIN).status_code == 200, "B knows it")

    served = []
    for i in range(8):
        on_a, on_b = chat(a, "shared-exp", user=f"u{i}"), chat(b, "shared-exp", user=f"u{i}")
        assert on_a.status_code == on_b.status_code == 200
        assert on_a.headers["x-gateway-experiment-arm"] == on_b.headers["x-gateway-experiment-arm"]
        served += [on_a.json(), on_b.json()]
    assert len({body["experiment"]["arm"] for body in served}) == 2  # both arms drawn
    # feedback on B for an answer A gave: the request rows live in the shared database
    from_a = served[0]
    poll(lambda: b.post("/v1/feedback", json={"id": from_a["id"], "score": 3}).status_code == 200,
         "B finds A's request")
    # PostgreSQL text cannot hold NUL: such strings are a 400, never the database's error as a 500
    nul = b.post("/v1/feedback", json={"id": "chatcmpl-\u0000", "score": 1})
    assert nul.status_code == 400 and nul.json()["error"]["param"] == "id"
    assert chat(a, "shared-exp", user="u\u0000").status_code == 400
    salted = a.post("/admin/experiments", json={**body, "name": "nul-exp", "salt": "a\u0000b"}, headers=ADMIN)
    assert salted.status_code == 400 and salted.json()["error"]["param"] == "salt"

    def totals():
        results = b.get("/admin/experiments/shared-exp/results", headers=ADMIN).json()
        return sum(arm["requests"] for arm in results["arms"]), sum(arm["feedback"]["count"] for arm in results["arms"])
    poll(lambda: totals() == (16, 1), "results count the requests of both replicas")

    assert b.post("/admin/experiments/shared-exp/stop", headers=ADMIN).status_code == 200
    poll(lambda: a.get("/admin/experiments/shared-exp", headers=ADMIN).json()["state"] == "stopped", "A sees it")
    assert b.delete("/admin/experiments/shared-exp", headers=ADMIN).status_code == 200
    poll(lambda: a.get("/admin/experiments/shared-exp", headers=ADMIN).status_code == 404, "A forgets it")


# ---- training -------------------------------------------------------------------------------------
def count_runs(client, runs: list[tuple[str, str]], name: str) -> None:
    jobs = gateway_of(client).training
    original = jobs._run_job

    async def counted(record):
        runs.append((name, record.id))
        await original(record)

    jobs._run_job = counted


def test_each_job_runs_once_and_its_adapter_serves_everywhere(fleet):
    a, b = fleet
    runs: list[tuple[str, str]] = []
    count_runs(a, runs, "a")
    count_runs(b, runs, "b")
    ids = []
    for i, client in enumerate((a, b, a)):
        response = submit(client, jsonl(rows()), kind="ia3", max_steps=1, batch_size=4, adapter_id=f"trained-{i}")
        assert response.status_code == 201, response.text
        ids.append(response.json()["id"])
    for job_id in ids:
        job = poll(lambda j=job_id: (lambda r: r if r.get("state") in TERMINAL else None)(job_view(b, j)),
                   f"job {job_id} ends")
        assert job["state"] == SUCCEEDED, job
    assert sorted(job_id for _, job_id in runs) == sorted(ids)  # each once, whoever ran it
    for i in range(3):
        for client in (a, b):
            poll(lambda c=client, n=i: chat(c, f"trained-{n}").status_code == 200, "the trained adapter serves")


def test_a_stopped_claimer_leaves_its_job_to_the_other_which_resumes_it(postgres_url, tmp_path, adapters_root):
    with two_gateways(postgres_url, tmp_path, adapters_root, training_lease_seconds=3) as (a, b):
        stop_a_claimer_and_resume(a, b)


def stop_a_claimer_and_resume(a, b) -> None:
    job_id = submit(a, jsonl(rows()), kind="lora", max_steps=100_000, checkpoint_every=2).json()["id"]
    claimer = poll(lambda: next((c for c in (a, b) if gateway_of(c).training._current == job_id), None),
                   "one replica claims the job")
    other = b if claimer is a else a
    poll(lambda: job_view(claimer, job_id).get("progress", {}).get("step", 0) >= 3, "a checkpoint is written")
    # the claimer stops as a killed process would: no more steps, no lease renewal, no release
    scheduler = gateway_of(claimer).training._scheduler
    claimer.portal.call(scheduler.cancel)
    job = poll(lambda: (lambda j: j if j.get("progress", {}).get("resumed_from_step") is not None else None)(
        job_view(other, job_id)), "the other replica resumes it")
    assert job["state"] == "running" and job["progress"]["resumed_from_step"] >= 2
    assert gateway_of(other).training._current == job_id
    assert other.post(f"/admin/training-jobs/{job_id}/cancel", headers=ADMIN).json()["state"] == "cancelled"


def test_a_cancel_on_one_replica_stops_the_job_on_the_other(postgres_url, tmp_path, adapters_root):
    with two_gateways(postgres_url, tmp_path, adapters_root, training_lease_seconds=3) as (a, b):
        cancel_on_the_other(a, b)


def cancel_on_the_other(a, b) -> None:
    job_id = submit(a, jsonl(rows()), kind="lora", max_steps=100_000).json()["id"]
    runner = poll(lambda: next((c for c in (a, b) if gateway_of(c).training._current == job_id), None),
                  "one replica runs it")
    other = b if runner is a else a
    poll(lambda: job_view(other, job_id).get("state") == "running", "the other sees it running")
    assert other.post(f"/admin/training-jobs/{job_id}/cancel", headers=ADMIN).json()["state"] == "cancelled"
    poll(lambda: gateway_of(runner).training._current is None, "the runner stops it at its next renewal")
    poll(lambda: job_view(runner, job_id).get("state") == "cancelled", "the runner shows it cancelled")


# ---- console sessions -----------------------------------------------------------------------------
def console_sign_in(replica: TestClient) -> tuple[dict, str]:
    """Sign a browser in on ``replica``; its cookie header (to send to any replica) and CSRF token."""
    browser = TestClient(replica.app, follow_redirects=False)  # the replica's lifespan is already running
    assert browser.post("/console/sign-in", data={"key": ADMIN["Authorization"].removeprefix("Bearer ")}
                        ).status_code == 303
    token = browser.get("/console/api/session").json()["csrf_token"]
    return {"cookie": f"{COOKIE_NAME}={browser.cookies[COOKIE_NAME]}"}, token


def test_a_console_session_is_good_on_every_replica_and_a_sign_out_ends_it_on_all(fleet):
    a, b = fleet
    cookie, token = console_sign_in(a)
    # forged cookies (quotes, a statement, an overlong or empty id) reach the shared table as
    # digests or not at all: a 401 in OpenAI's shape, and the real session is unaffected
    for forged in ("' OR '1'='1", "x'; DELETE FROM console_sessions; --", "A" * 5000, '""'):
        refused = b.get("/admin/adapters", headers={"cookie": f"{COOKIE_NAME}={forged}"})
        assert refused.status_code == 401, refused.text
        assert set(refused.json()["error"]) == {"message", "type", "param", "code"}
    session = b.get("/console/api/session", headers=cookie).json()
    assert session["signed_in"] is True and session["csrf_token"] == token
    assert b.get("/admin/adapters", headers=cookie).status_code == 200
    assert b.post("/admin/adapters/none/pin", headers=cookie).status_code == 403  # B checks the CSRF token too
    assert b.post("/console/api/sign-out", headers={**cookie, CSRF_HEADER: token}).status_code == 200
    for replica in (a, b):
        assert replica.get("/admin/adapters", headers=cookie).status_code == 401


# ---- faults ---------------------------------------------------------------------------------------
def assert_unavailable(response) -> None:
    assert response.status_code == 503, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == "database_unavailable" and error["type"] == "server_error"


def test_postgres_down_serving_goes_on_writes_get_503_and_recover(tmp_path, adapters_root):
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    cluster = PostgresCluster.create()  # its own server: this test stops it
    try:
        url = cluster.create_database()
        with two_gateways(url, tmp_path, adapters_root) as (a, b):
            assert register(a, "known", "lora-1").status_code == 201
            poll(lambda: chat(b, "known").status_code == 200, "B serves it")
            cookie, _ = console_sign_in(a)
            cluster.stop()
            checked = b.get("/admin/adapters", headers=cookie)  # the session cannot be checked
            assert_unavailable(checked)
            assert "postgresql" not in checked.text and "127.0.0.1" not in checked.text  # to a caller not known yet
            assert_unavailable(TestClient(a.app).post("/console/sign-in", data={"key": "k" * 24}))
            for client in (a, b):
                assert chat(client, "known").status_code == 200  # from memory
            assert_unavailable(register(a, "new", "lora-2"))
            assert_unavailable(a.delete("/admin/adapters/known", headers=ADMIN))
            assert chat(a, "known").status_code == 200  # the refused delete left it served
            assert_unavailable(a.post("/admin/adapters/known/pin", headers=ADMIN))
            assert described(a, "known")["pinned"] is False  # the refused pin left nothing behind
            arms = [{"name": "known", "weight": 1}, {"name": "tiny", "weight": 1}]
            assert_unavailable(b.post("/admin/experiments", headers=ADMIN, json={"name": "e", "arms": arms}))
            assert_unavailable(submit(a, jsonl(rows()), kind="ia3", max_steps=1))
            assert_unavailable(b.post("/v1/files", headers=ADMIN, files={"file": ("d.jsonl", jsonl(rows()))},
                                      data={"purpose": "fine-tune"}))
            poll(lambda: not gateway_of(b).changes.connected, "B's listener notices")
            cluster.start()
            poll(lambda: gateway_of(b).changes.connected, "B's listener reconnects")
            poll(lambda: register(a, "new", "lora-2").status_code == 201, "writes work again")
            poll(lambda: chat(b, "new").status_code == 200, "B follows changes again")
            assert b.get("/admin/adapters", headers=cookie).status_code == 200  # the session outlived the outage
            assert gateway_of(b).changes.reconnects >= 2
            figures = b.get("/metrics").text
            assert "gateway_database_listener_connected 1.0" in figures
            assert "gateway_database_resync_errors_total" in figures
    finally:
        cluster.destroy()
