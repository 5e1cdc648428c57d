"""Pacing of background work (training micro-steps) between serving steps."""

from __future__ import annotations

import pytest

from gateway.background import BackgroundWork


class Counter:
    def __init__(self, more: bool = True):
        self.calls = 0
        self.more = more

    def __call__(self) -> bool:
        self.calls += 1
        return self.more


def test_runs_every_step_when_nothing_is_served():
    work = Counter()
    bg = BackgroundWork(work, duty_cycle=0.25)
    bg.wake()
    for _ in range(5):
        bg.after_step(serving=False, step_seconds=0.0)
    assert work.calls == 5


def test_serving_earns_the_only_budget():
    work = Counter()
    bg = BackgroundWork(work, duty_cycle=0.25)
    bg.wake()
    for _ in range(5):  # serving steps that took no time earn nothing
        bg.after_step(serving=True, step_seconds=0.0)
    assert work.calls == 0
    bg.after_step(serving=True, step_seconds=0.3)  # earns 0.3 * 0.25 / 0.75 = 0.1 s
    assert work.calls == 1


def test_a_slow_unit_is_paid_back_by_serving_before_the_next():
    calls = []

    def slow() -> bool:
        calls.append(1)
        bg.credit -= 1.0  # as if the unit had taken one more second than measured
        return True

    bg = BackgroundWork(slow, duty_cycle=0.5)
    bg.wake()
    bg.after_step(serving=True, step_seconds=0.1)  # credit 0.1 -> runs, then about -0.9
    for _ in range(8):  # 0.8 s of serving at duty 0.5 earns 0.8 s: not yet back above zero
        bg.after_step(serving=True, step_seconds=0.1)
    assert len(calls) == 1
    bg.after_step(serving=True, step_seconds=0.2)
    assert len(calls) == 2


def test_idle_work_stops_until_woken_and_a_failure_does_not_escape():
    work = Counter(more=False)
    bg = BackgroundWork(work, duty_cycle=0.25)
    bg.after_step(serving=False, step_seconds=0.0)
    assert work.calls == 0  # never woken
    bg.wake()
    bg.after_step(serving=False, step_seconds=0.0)
    bg.after_step(serving=False, step_seconds=0.0)
    assert work.calls == 1 and not bg.wanted

    def broken() -> bool:
        raise RuntimeError("boom")

    failing = BackgroundWork(broken, duty_cycle=0.25)
    failing.wake()
    failing.after_step(serving=False, step_seconds=0.0)
    assert not failing.wanted


def test_a_wake_during_a_unit_is_not_lost():
    def finds_nothing_but_gets_woken() -> bool:
        bg.wake()  # a job queued while this unit ran
        return False

    bg = BackgroundWork(finds_nothing_but_gets_woken, duty_cycle=0.25)
    bg.wake()
    bg.after_step(serving=False, step_seconds=0.0)
    assert bg.wanted


def test_a_job_queued_just_after_a_request_still_waits_out_the_grace():
    """A request served while nothing was wanted, then a job queued: the first idle step is
    within the grace, so no unit starts (the last serving step was not remembered while no work
    was wanted, and a seconds-long micro-step started in the gap)."""
    work = Counter()
    bg = BackgroundWork(work, duty_cycle=0.5, idle_grace=60.0)
    bg.after_step(serving=True, step_seconds=0.0)
    bg.wake()
    bg.after_step(serving=False, step_seconds=0.0)
    assert work.calls == 0


def test_duty_cycle_bounds():
    with pytest.raises(ValueError):
        BackgroundWork(Counter(), duty_cycle=1.0)


def test_a_short_pause_in_serving_does_not_start_work():
    work = Counter()
    bg = BackgroundWork(work, duty_cycle=0.25, idle_grace=3600.0)
    bg.wake()
    bg.after_step(serving=True, step_seconds=0.0)  # earns nothing
    bg.after_step(serving=False, step_seconds=0.0)  # the gap before the client's next request
    assert work.calls == 0
    idle = BackgroundWork(work, duty_cycle=0.25, idle_grace=0.0)
    idle.wake()
    idle.after_step(serving=True, step_seconds=0.0)
    idle.after_step(serving=False, step_seconds=0.0)
    assert work.calls == 1
