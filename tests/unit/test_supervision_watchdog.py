"""The watchdog's bookkeeping: per-request deadlines and idle pings. No processes."""

from __future__ import annotations

import asyncio

import pytest

from streamer.workers.watchdog import Watchdog

pytestmark = pytest.mark.timeout(10)


async def test_a_short_deadline_wakes_a_watchdog_sleeping_towards_a_long_one() -> None:
    loop = asyncio.get_running_loop()
    watchdog = Watchdog(hang_timeout_s=60.0)
    watchdog.sent(1, None, loop.time(), ping=False)  # the default: 60 s
    due = asyncio.ensure_future(watchdog.due())
    await asyncio.sleep(0)  # let it go to sleep towards the 60 s deadline
    sent = loop.time()
    watchdog.sent(2, 0.3, sent, ping=False)
    overdue = await asyncio.wait_for(due, 5)
    assert overdue == [2]
    assert 0.3 <= loop.time() - sent < 0.5
    # Request 2 waited behind request 1, which is in service within its own deadline:
    # the worker is killed, but 2 never ran, so neither is taken for the hang.
    assert watchdog.expired == set()


async def test_only_the_request_in_service_is_blamed_for_a_hang_noticed_late() -> None:
    """Seen in a full CI run (test_worker_faults, 2 cores under load): the watchdog woke
    after both the hanging request's deadline and that of the one queued behind it, at
    the same 5 s floor, and both callers were told hung=True. The queued record, run
    alone on its retry and killed again behind the hanging one, was dead-lettered as
    worker-hung though it never ran."""
    loop = asyncio.get_running_loop()
    watchdog = Watchdog(hang_timeout_s=60.0)
    now = loop.time()
    watchdog.sent(7, 0.05, now - 0.2, ping=False)  # in service: it hangs
    watchdog.sent(8, 0.05, now - 0.1, ping=False)  # queued behind it
    overdue = await asyncio.wait_for(watchdog.due(), 5)
    assert sorted(overdue) == [7, 8]  # the worker is killed either way
    assert watchdog.expired == {7}


async def test_an_answered_request_has_no_deadline_and_only_requests_count_as_served() -> None:
    loop = asyncio.get_running_loop()
    watchdog = Watchdog(hang_timeout_s=None)
    watchdog.sent(1, 0.05, loop.time(), ping=False)
    watchdog.sent(2, None, loop.time(), ping=True)
    assert watchdog.answered(1, loop.time()) is True
    assert watchdog.answered(2, loop.time()) is False  # a ping
    assert watchdog.answered("ready", loop.time()) is False
    with pytest.raises(TimeoutError):  # nothing pending, no pings without hang_timeout_s
        await asyncio.wait_for(watchdog.due(), 0.2)
    assert not watchdog.expired


async def test_an_idle_worker_is_pinged_after_half_the_hang_timeout() -> None:
    loop = asyncio.get_running_loop()
    watchdog = Watchdog(hang_timeout_s=0.4)
    watchdog.answered("ready", loop.time())
    started = loop.time()
    assert await asyncio.wait_for(watchdog.due(), 5) is None  # None: send a ping
    assert 0.2 <= loop.time() - started < 0.4
