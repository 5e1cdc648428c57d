"""Two experiment services (two replicas) on one store: a change made from a stale copy of a
definition is refused (409), never written over the other replica's change."""

from __future__ import annotations

import asyncio

import pytest
from test_experiment_bounds import make_service

from gateway.experiments.assignment import Arm
from gateway.experiments.errors import ExperimentConflictError


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

    try:
        asyncio.run(run())
    finally:
        a.close()
        b.close()
