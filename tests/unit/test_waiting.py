"""Cancellation while an event wait completes (CPython 3.11's wait_for swallows it), and the
teardown steps' bound."""

import asyncio
import logging

from gateway.database.changes import ChangeFeed
from gateway.shutdown import close_within
from gateway.waiting import wait_event


def test_wait_event_says_whether_the_event_was_set():
    async def scenario():
        event = asyncio.Event()
        assert await wait_event(event, 0.01) is False
        asyncio.get_running_loop().call_later(0.01, event.set)
        assert await wait_event(event, 5) is True
        assert len(asyncio.all_tasks()) == 1  # no waiter left behind

    asyncio.run(scenario())


async def in_the_window(wake) -> None:
    """Wake an event wait, then return while the inner wait is done but the waiting task has not
    resumed yet (CPython 3.11's wait_for swallows a cancellation that lands in these two turns)."""
    await asyncio.sleep(0.05)  # the task waits
    wake()
    await asyncio.sleep(0)


def test_a_change_feed_closed_as_a_notification_arrives_still_closes():
    async def scenario():
        feed = ChangeFeed(db=None, resync_seconds=60)

        async def handler():
            pass

        feed.subscribe("adapters", handler)
        feed._task = asyncio.get_running_loop().create_task(feed._apply())
        await in_the_window(lambda: feed._mark({"adapters"}))
        await feed.close()  # cancels the task at once; with wait_for on 3.11 it ran on, and this waited forever
        assert feed._task.cancelled()

    asyncio.run(asyncio.wait_for(scenario(), 5))


def test_a_hung_teardown_step_is_left_behind_and_the_next_one_runs(caplog):
    async def scenario():
        closed = []

        async def hangs():
            await asyncio.Event().wait()

        async def fails():
            raise RuntimeError("broken")

        async def closes():
            closed.append("last")

        await close_within("the stuck part", hangs(), 0.05)
        await close_within("the broken part", fails(), 1)
        await close_within("the last part", closes(), 1)
        return closed

    with caplog.at_level(logging.ERROR, logger="gateway.shutdown"):
        assert asyncio.run(scenario()) == ["last"]
    messages = [r.getMessage() for r in caplog.records]
    assert any("the stuck part did not finish within" in m for m in messages)
    assert any("the broken part failed" in m for m in messages)
