"""The fleet as one system: two gateway replicas on a local Ray cluster sharing one real
PostgreSQL registry (``GATEWAY_DATABASE_URL``) and one shared file store (a temporary folder as
``GATEWAY_SHARED_STORE_URL``), driven through the Serve ingress only.

The ingress routes with ``fleet_routing=plain`` here: without affinity each request lands on
either replica (Serve's load-based choice between two idle replicas), so asking until every
replica has answered (``x-gateway-replica``) reaches each one without a Serve handle per replica.
What one replica learns must then hold on the other: a registration, a replace, a delete, an
experiment's arms and results, a trained adapter, a console session and its sign-out; and what
was acknowledged survives a replica killed with SIGKILL. One fleet for the module."""

from __future__ import annotations

import io
import json
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from fleet_support import ADMIN, ADMIN_KEY, API_KEY, AUTH, REPLICA, kill_mid_stream
from support import build_small_llama, build_tokenizer, make_peft_adapter

from gateway.settings import Settings

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402

pytestmark = pytest.mark.ray
APP = "shared-fleet"
WAIT = 120.0  # a generous bound on what holds within about a second when things work
PROPAGATION: list[float] = []  # registration acknowledged -> served by every replica (seconds)


@pytest.fixture(scope="module")
def shared_fleet(ray_cluster: str, postgres_cluster, tmp_path_factory) -> Iterator[tuple[str, Path]]:
    from gateway.fleet.app import build_fleet

    root = tmp_path_factory.mktemp("shared-fleet")
    tokenizer = build_tokenizer()
    model = build_small_llama(len(tokenizer))
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    for seed, (name, kind) in enumerate((("lora-1", "lora"), ("lora-2", "lora"), ("ia3-1", "ia3"))):
        make_peft_adapter(model, kind, root / "sources" / name, seed=seed, **({"r": 4, "lora_alpha": 8}
                                                                              if kind == "lora" else {}))
    (root / "shared").mkdir()  # a shared store must exist (a missing mount is refused, never made private)
    settings = Settings(model=str(root / "model"), served_model_name="tiny", quantization="none", device="cpu",
                        data_dir=root / "data", api_keys=[API_KEY], admin_key=ADMIN_KEY, replicas=2,
                        replica_num_cpus=0.5, max_device_adapters=2, max_batch_size=4, fleet_routing="plain",
                        database_url=postgres_cluster.create_database(), shared_store_url=str(root / "shared"),
                        # leases long enough that a busy machine never lets one lapse while its holder lives
                        training_lease_seconds=60)
    serve.run(build_fleet(settings), name=APP, route_prefix="/")
    yield ray_cluster, root / "sources"
    serve.delete(APP)
    if PROPAGATION:
        print(f"\nregistration -> servable on both replicas: median {statistics.median(PROPAGATION):.3f} s "
              f"of {[round(t, 3) for t in PROPAGATION]}")


def handle():
    return serve.get_deployment_handle("GatewayReplica", app_name=APP)


def on_every_replica(ask: Callable[[], object], names: set[str] | None = None, tries: int = 400) -> dict[str, object]:
    """Ask ``ask`` (a Serve handle call answering ``(replica name, value)``) until ``names`` (or
    two replicas) answered: replica name -> its answer."""
    seen: dict[str, object] = {}
    for _ in range(tries):
        try:
            name, value = ask()
        except ray.exceptions.RayError:  # a replica that just died, not yet known dead to the router
            time.sleep(0.2)
            continue
        seen[name] = value
        if (names is not None and names <= set(seen)) or (names is None and len(seen) >= 2):
            return seen
    raise AssertionError(f"only {sorted(seen)} answered")


def replica_pids() -> dict[str, int]:
    return on_every_replica(lambda: handle().whoami.remote().result(timeout_s=120))


def until_each_replica(call: Callable[[], httpx.Response], ok: Callable[[httpx.Response], bool],
                       replicas: set[str], what: str) -> dict[str, httpx.Response]:
    """Send ``call`` through the ingress until each of ``replicas`` gave an answer that is ``ok``
    (a replica's earlier answers may not be: it has not learned the change yet)."""
    good: dict[str, httpx.Response] = {}
    deadline = time.monotonic() + WAIT
    while not replicas <= set(good):
        assert time.monotonic() < deadline, f"never on every replica: {what}; so far on {sorted(good)}"
        response = call()
        name = response.headers.get(REPLICA)
        if name in replicas and ok(response):
            good[name] = response
    return good


def chat(url: str, model: str, max_tokens: int = 2, **extra) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hello world"}], "max_tokens": max_tokens,
            "temperature": 0, **extra}
    return httpx.post(f"{url}/v1/chat/completions", json=body, headers=AUTH, timeout=120)


def upload(url: str, adapter_id: str, folder: Path, replace: bool = False) -> httpx.Response:
    files = [("files", (p.name, p.read_bytes())) for p in sorted(folder.iterdir()) if p.is_file()]
    return httpx.post(f"{url}/admin/adapters", headers=ADMIN, files=files,
                      data={"id": adapter_id, "replace": "true" if replace else "false"}, timeout=120)


def described(url: str, adapter_id: str) -> httpx.Response:
    return httpx.get(f"{url}/admin/adapters/{adapter_id}", headers=ADMIN, timeout=60)


def status(code: int) -> Callable[[httpx.Response], bool]:
    return lambda r: r.status_code == code


def test_register_replace_and_delete_reach_every_replica(shared_fleet):
    url, sources = shared_fleet
    replicas = set(replica_pids())
    registered = upload(url, "shared-a", sources / "lora-1")
    assert registered.status_code == 201, registered.text
    acknowledged = time.monotonic()
    until_each_replica(lambda: chat(url, "shared-a"), status(200), replicas, "shared-a served")
    PROPAGATION.append(time.monotonic() - acknowledged)
    first = registered.json()["content_hash"]

    replaced = upload(url, "shared-a", sources / "lora-2", replace=True)
    assert replaced.status_code == 201, replaced.text
    second = replaced.json()["content_hash"]
    assert second != first
    until_each_replica(lambda: described(url, "shared-a"),
                       lambda r: r.status_code == 200 and r.json()["content_hash"] == second, replicas,
                       "the new version described")
    until_each_replica(lambda: chat(url, "shared-a"), status(200), replicas, "the new version served")

    deleted = httpx.delete(f"{url}/admin/adapters/shared-a", headers=ADMIN, timeout=120)
    assert deleted.status_code == 200, deleted.text
    gone = until_each_replica(lambda: chat(url, "shared-a"), status(404), replicas, "shared-a refused")
    assert all(r.json()["error"]["code"] == "model_not_found" for r in gone.values())

    for n in range(2):  # a few more registrations for the propagation figure
        assert upload(url, f"timed-{n}", sources / "ia3-1").status_code == 201
        acknowledged = time.monotonic()
        until_each_replica(lambda n=n: chat(url, f"timed-{n}"), status(200), replicas, f"timed-{n} served")
        PROPAGATION.append(time.monotonic() - acknowledged)


def test_an_experiment_assigns_the_same_arm_everywhere_and_its_results_aggregate(shared_fleet):
    url, sources = shared_fleet
    replicas = set(replica_pids())
    for adapter_id, folder in (("arm-lora", "lora-1"), ("arm-ia3", "ia3-1")):
        assert upload(url, adapter_id, sources / folder).status_code == 201
    body = {"name": "fleet-exp", "arms": [{"name": "arm-lora", "weight": 1}, {"name": "arm-ia3", "weight": 1}],
            "salt": "fixed"}
    created = httpx.post(f"{url}/admin/experiments", json=body, headers=ADMIN, timeout=60)
    assert created.status_code == 201, created.text
    until_each_replica(lambda: httpx.get(f"{url}/admin/experiments/fleet-exp", headers=ADMIN, timeout=60),
                       status(200), replicas, "the experiment known")

    sent = 0
    arms: dict[str, set[str]] = {}
    for i in range(6):
        user = f"user-{i}"

        def ask(user=user):
            nonlocal sent
            sent += 1
            return chat(url, "fleet-exp", user=user)
        answered = until_each_replica(ask, status(200), replicas, f"{user} answered")
        arms[user] = {r.headers["x-gateway-experiment-arm"] for r in answered.values()}
    assert all(len(drawn) == 1 for drawn in arms.values()), arms  # one arm per user, whichever replica
    assert {arm for drawn in arms.values() for arm in drawn} == {"arm-lora", "arm-ia3"}

    def total_requests(r: httpx.Response) -> bool:
        return r.status_code == 200 and sum(arm["requests"] for arm in r.json()["arms"]) == sent
    until_each_replica(lambda: httpx.get(f"{url}/admin/experiments/fleet-exp/results", headers=ADMIN, timeout=60),
                       total_requests, replicas, f"results count all {sent} requests")


def test_a_training_job_runs_once_in_the_fleet_and_its_adapter_serves_everywhere(shared_fleet):
    url, _ = shared_fleet
    replicas = set(replica_pids())
    dataset = "\n".join(json.dumps({"prompt": f"the quick fox {i}", "completion": "how are you?"})
                        for i in range(8)).encode()
    config = {"kind": "ia3", "max_steps": 2, "batch_size": 4, "adapter_id": "fleet-trained"}
    submitted = httpx.post(f"{url}/admin/training-jobs", headers=ADMIN, timeout=120,
                           files={"dataset": ("data.jsonl", io.BytesIO(dataset))}, data={"config": json.dumps(config)})
    assert submitted.status_code == 201, submitted.text
    job_id = submitted.json()["id"]
    deadline = time.monotonic() + WAIT
    while (job := httpx.get(f"{url}/admin/training-jobs/{job_id}", headers=ADMIN, timeout=60).json())["state"] \
            not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, f"job never ended: {job}"
        time.sleep(0.2)
    assert job["state"] == "succeeded", job
    until_each_replica(lambda: chat(url, "fleet-trained"), status(200), replicas, "the trained adapter served")
    claims = on_every_replica(lambda: handle().training_claims.remote().result(timeout_s=60), replicas)
    assert sum(list(ids).count(job_id) for ids in claims.values()) == 1, claims  # claimed by exactly one


def test_a_console_session_is_good_on_every_replica_until_signed_out(shared_fleet):
    """Signed in through the ingress (on whichever replica took it), the browser is signed in on
    both replicas, with no affinity; a sign-out on one ends it on both (sessions in PostgreSQL)."""
    url, _ = shared_fleet
    replicas = set(replica_pids())
    signed = httpx.post(f"{url}/console/sign-in", data={"key": ADMIN_KEY}, headers={"Origin": url}, timeout=60)
    assert signed.status_code == 303, signed.text
    cookies = {"gateway_console": signed.cookies["gateway_console"]}
    codes: list[int] = []

    def session() -> httpx.Response:
        response = httpx.get(f"{url}/console/api/session", cookies=cookies, timeout=60)
        codes.append(response.status_code)
        return response

    answers = until_each_replica(session, lambda r: r.status_code == 200 and r.json()["signed_in"], replicas,
                                 "the session admitted")
    assert set(codes) == {200}  # never a 401 from the replica that did not sign the browser in
    token = next(iter(answers.values())).json()["csrf_token"]
    out = httpx.post(f"{url}/console/api/sign-out", cookies=cookies, headers={"X-CSRF-Token": token}, timeout=60)
    assert out.status_code == 200, out.text
    codes.clear()
    until_each_replica(session, status(401), replicas, "the session ended")
    assert set(codes) == {401}


def test_a_replica_killed_mid_stream_errors_cleanly_and_nothing_acknowledged_is_lost(shared_fleet):
    url, sources = shared_fleet
    durable = upload(url, "durable", sources / "lora-1")
    assert durable.status_code == 201, durable.text  # acknowledged before the kill
    pids = replica_pids()
    until_each_replica(lambda: chat(url, "durable"), status(200), set(pids), "durable served")
    victim, error = kill_mid_stream(url, "durable", pids.__getitem__)
    assert error["code"] == "replica_unavailable" and error["type"] == "server_error"

    survivor = next(name for name in pids if name != victim)
    # the fleet keeps serving (the survivor answers; the dead replica's requests are refused cleanly)
    until_each_replica(lambda: chat(url, "durable"), status(200), {survivor}, "the survivor serves")
    restarted: set[str] = set()
    deadline = time.monotonic() + WAIT
    while len(restarted) < 2:  # Ray brings a new replica up in the dead one's place
        assert time.monotonic() < deadline, f"no replica replaced {victim}; answering: {sorted(restarted)}"
        try:
            name, _ = handle().whoami.remote().result(timeout_s=120)
        except ray.exceptions.RayError:  # the dead one, not yet known dead to the router
            time.sleep(0.2)
            continue
        if name != victim:
            restarted.add(name)
    assert survivor in restarted
    until_each_replica(lambda: chat(url, "durable"), status(200), restarted,
                       "the registration acknowledged before the kill, on the restarted replica too")
