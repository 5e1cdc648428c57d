"""Two experiment services (two replicas) on one store: a change made from a stale copy of a
definition is refused (409), never written over the other replica's change."""

from __future__ import annotations

import asyncio

import pytest
from test_experiment_bounds import make_service

from gateway.experiments.assignment import Arm
from gateway.experiments.errors import ExperimentConflictError


def run_then_close(scenario, *replicas) -> None:
    """Run the async ``scenario``, then close every replica's service, whatever happened."""
    try:
        asyncio.run(scenario())
    finally:
        for replica in replicas:
            replica.close()


def test_a_change_from_a_stale_copy_is_a_409_and_the_other_replicas_change_stands(tmp_path):
    a, _ = make_service(tmp_path)
    b, _ = make_service(tmp_path)

    async def run():
        await a.create("exp", [Arm("a", 50), Arm("b", 50)], "request")
        await b.sync()
        await a.promote("exp", "b")  # B has not heard of it yet
        with pytest.raises(ExperimentConflictError, match="changed on another replica"):
            await b.set_weights("exp", {"b": 90})
        assert (b.get("exp").state, b.get("exp").winner) == ("promoted", "b")  # B read it again
        await a.sync()
        assert (a.get("exp").state, a.get("exp").winner) == ("promoted", "b")  # the promotion stands

        await a.create("two", [Arm("a", 50), Arm("b", 50)], "request")
        await b.sync()
        await a.delete("two")
        with pytest.raises(ExperimentConflictError):
            await b.stop("two")
        assert "two" not in {e.name for e in b.list()}

    run_then_close(run, a, b)


def test_max_experiments_counts_every_replicas_experiments(tmp_path):
    """Each replica counted the experiments in its own memory: two replicas, each at limit - 1,
    created one each and the limit was passed. The count is now taken in the inserting transaction."""
    a, _ = make_service(tmp_path, max_experiments=2)
    b, _ = make_service(tmp_path, max_experiments=2)

    async def run():
        await a.create("first", [Arm("a", 50), Arm("b", 50)], "request")
        await b.create("second", [Arm("a", 50), Arm("b", 50)], "request")  # neither has heard of the other's
        with pytest.raises(ExperimentConflictError, match="2 experiments exist, the limit"):
            await a.create("third", [Arm("a", 50), Arm("b", 50)], "request")
        assert "third" not in {e.name for e in a.list()}
        await b.sync()
        await b.delete("first")
        await a.create("third", [Arm("a", 50), Arm("b", 50)], "request")

    run_then_close(run, a, b)


def test_feedback_that_arrives_before_the_request_row_waits_for_it(tmp_path):
    """Replicas sharing a database write a request's row after its answer went out: feedback
    sent at once to another replica found no row and got a 404 (16 of 40 tries)."""
    import time

    from gateway.experiments.store import RequestRow

    a, _ = make_service(tmp_path)
    b, _ = make_service(tmp_path, recording_lag_seconds=2.0)

    async def run():
        await a.create("exp", [Arm("a", 50), Arm("b", 50)], "request")
        row = RequestRow("chatcmpl-late", "exp", "a", None, "chat", 0.1, 0.2, 1, 1, None, time.time())

        async def recorded_later():
            await asyncio.sleep(0.3)
            await asyncio.to_thread(a.store.add_request, row)

        later = asyncio.ensure_future(recorded_later())
        answer = await b.feedback("chatcmpl-late", 1.0, None)
        await later
        assert answer["arm"] == "a"
        with pytest.raises(Exception, match="no request routed"):  # an unknown id still ends, after the wait
            await b.feedback("chatcmpl-never", 1.0, None)

    run_then_close(run, a, b)


def test_an_adapter_and_an_experiment_on_it_are_never_deleted_and_created_both(store_backend):
    """Replica A deletes adapter "x" while replica B, not told yet, creates an experiment with "x"
    as an arm: both succeeded, and the experiment routed its traffic to a deleted adapter (404s).
    Each write now checks the other table in its own transaction, the adapter's row locked."""
    from adapters.errors import AdapterConflictError
    from adapters.store import AdapterRecord, SqlAdapterStore, SqliteAdapterStore
    from gateway.experiments.errors import UnknownArmModelError
    from gateway.experiments.service import ExperimentService
    from gateway.experiments.store import Experiment, SqlExperimentStore, SqliteExperimentStore

    adapters = store_backend.open(SqliteAdapterStore, SqlAdapterStore)
    experiments = store_backend.open(SqliteExperimentStore, SqlExperimentStore)
    try:
        for name in ("x", "y"):
            adapters.put(AdapterRecord(name, "a" * 64, "lora", 1, 1.0))

        def experiment(name: str, arms: tuple[str, ...]) -> Experiment:
            return Experiment(name=name, salt="s", arms=[Arm(a, 50) for a in arms], stickiness="request",
                              subject_header=None, state="running", created=1.0, updated=1.0)

        adapters.delete("x")  # on A
        with pytest.raises(UnknownArmModelError, match="'x' is no longer a registered adapter"):
            experiments.insert_experiment(experiment("exp", ("base", "x")), ["x"])  # on B
        with pytest.raises(ExperimentConflictError, match="name of a model"):
            experiments.insert_experiment(experiment("y", ("base",)), [])
        experiments.insert_experiment(experiment("exp", ("base", "y")), ["y"])  # on B, first this time
        with pytest.raises(AdapterConflictError, match="serves traffic of the running experiment 'exp'"):
            adapters.delete("y", lambda tx: ExperimentService.delete_row_guard(tx, "y"))  # on A
        assert [r.id for r in adapters.load_all()] == ["y"]
    finally:
        adapters.close()
        experiments.close()


def test_an_adapter_and_an_experiment_never_both_take_one_name(store_backend):
    """Replica A creates experiment "n" while replica B, not told yet, registers an adapter "n":
    B's registration checked its memory only, and both committed (requests for "n" went to one of
    them at random, per replica). The registration now checks the experiments table in its
    transaction, and both writers lock the name first: here A commits while B waits between its
    check and its insert, the interleaving that let both through."""
    import threading

    from adapters.errors import AdapterConflictError
    from adapters.store import AdapterRecord, SqlAdapterStore, SqliteAdapterStore
    from gateway.experiments.service import ExperimentService
    from gateway.experiments.store import Experiment, SqlExperimentStore, SqliteExperimentStore

    adapters = store_backend.open(SqliteAdapterStore, SqlAdapterStore)
    experiments = store_backend.open(SqliteExperimentStore, SqlExperimentStore)

    def experiment(name: str) -> Experiment:
        return Experiment(name=name, salt="s", arms=[Arm("base", 100)], stickiness="request", subject_header=None,
                          state="running", created=1.0, updated=1.0)

    def register(name: str, guard) -> None:
        adapters.put(AdapterRecord(name, "a" * 64, "lora", 1, 1.0), guard=guard)

    try:
        experiments.insert_experiment(experiment("taken"), [])  # on A, B not told
        with pytest.raises(AdapterConflictError, match="'taken' is the name of an experiment"):
            register("taken", lambda tx: ExperimentService.name_row_guard(tx, "taken"))  # on B

        committed, outcome = threading.Event(), {}  # B's registration must succeed, A's create not

        def checked_then_waits(tx):  # B between its check and its insert, for up to 1 s
            reason = ExperimentService.name_row_guard(tx, "n")
            committed.wait(1.0)
            return reason

        def create_on_a() -> None:
            try:
                experiments.insert_experiment(experiment("n"), [])
                outcome["experiment"] = "created"
            except ExperimentConflictError as exc:
                outcome["experiment"] = str(exc)
            committed.set()

        creating = threading.Timer(0.2, create_on_a)  # starts once B holds the name
        creating.start()
        register("n", checked_then_waits)
        creating.join(10)
        assert "already the name of a model" in outcome["experiment"]  # A waited for B, then saw it
        assert [e.name for e in experiments.load_experiments()] == ["taken"]
    finally:
        adapters.close()
        experiments.close()


def test_requests_served_while_the_database_is_down_are_recorded_once_it_is_back(tmp_path):
    """Every request row written while the shared database could not be reached was dropped after
    one try: the results missed them and feedback on them was a 404 for good."""
    import time

    from adapters.sql import DatabaseUnavailableError
    from gateway.experiments.store import RequestRow

    service, _ = make_service(tmp_path)
    real_add, down = service.store.add_request, [True]

    def add_request(row):
        if down[0]:
            raise DatabaseUnavailableError("the database cannot be reached")
        real_add(row)

    service.store.add_request = add_request

    async def run():
        await service.create("exp", [Arm("a", 50), Arm("b", 50)], "request")
        for i in range(3):
            row = RequestRow(f"chatcmpl-{i}", "exp", "a", None, "chat", 0.1, 0.2, 1, 1, None, time.time())
            await service._run(service._record, row)  # as observe() queues it
        down[0] = False
        await service.sync()  # the change feed's resync after the reconnect
        for i in range(3):
            assert (await service.feedback(f"chatcmpl-{i}", 1.0, None))["arm"] == "a"
        results = await service.results("exp")
        assert sum(arm["requests"] for arm in results["arms"]) == 3

    run_then_close(run, service)
