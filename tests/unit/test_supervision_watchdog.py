"""The watchdog's bookkeeping: per-request deadlines and idle pings. No processes."""

from __future__ import annotations

import asyncio

import pytest

from streamer.workers.watchdog import Watchdog

pytestmark = pytest.mark.timeout(10)


async def test_a_request_sent_to_an_idle_worker_wakes_a_watchdog_sleeping_towards_a_ping() -> None:
    loop = asyncio.get_running_loop()
    watchdog = Watchdog(hang_timeout_s=60.0)
    watchdog.answered("ready", loop.time())
    due = asyncio.ensure_future(watchdog.due())
    await asyncio.sleep(0)  # let it go to sleep towards the ping, 30 s away
    sent = loop.time()
    watchdog.sent(1, 0.3, sent, ping=False)
    assert await asyncio.wait_for(due, 5) == 1
    assert 0.3 <= loop.time() - sent < 0.5
    assert watchdog.expired == {1}


async def test_a_request_queued_behind_another_is_timed_from_when_the_worker_gets_to_it() -> None:
    """Seen in a full CI run (test_worker_faults, 2 cores under load): a small batch
    queued behind the hanging record had a shorter deadline than the record's own, so
    it ran out first. The worker was killed with nobody in service past a deadline,
    the hanging record was told hung=False each time, and after three such attempts it
    was dead-lettered as worker-crashed, not worker-hung. The worker serves one
    request at a time: a queued request's deadline starts when the one before it is
    answered, and only the request in service can run out of time."""
    loop = asyncio.get_running_loop()
    watchdog = Watchdog(hang_timeout_s=60.0)
    now = loop.time()
    watchdog.sent(1, 1.0, now - 0.5, ping=False)  # in service, within its deadline
    watchdog.sent(2, 0.1, now - 0.5, ping=False)  # queued: its 0.1 s has not started
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(watchdog.due(), 0.2)  # nothing to kill yet
    answered = loop.time()
    assert watchdog.answered(1, answered) is True  # the worker gets to request 2 now
    assert await asyncio.wait_for(watchdog.due(), 5) == 2
    assert 0.1 <= loop.time() - answered < 0.3
    assert watchdog.expired == {2}


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
    assert await asyncio.wait_for(watchdog.due(), 5) == 7  # the worker is killed
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


async def test_the_last_reply_wakes_a_watchdog_sleeping_towards_a_long_deadline_to_ping() -> None:
    loop = asyncio.get_running_loop()
    watchdog = Watchdog(hang_timeout_s=0.4)
    watchdog.answered("ready", loop.time())
    watchdog.sent(1, 30.0, loop.time(), ping=False)
    due = asyncio.ensure_future(watchdog.due())
    await asyncio.sleep(0)  # let it go to sleep towards request 1's 30 s
    answered = loop.time()
    watchdog.answered(1, answered)
    assert await asyncio.wait_for(due, 5) is None  # idle now: a ping, 0.2 s after the reply
    assert 0.2 <= loop.time() - answered < 0.4
