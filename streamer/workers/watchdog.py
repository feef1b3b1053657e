"""The watchdog's bookkeeping for one worker: request deadlines and idle pings.

Every request may carry its own time limit (``WorkerProcess.call(body, timeout_s)``,
else the worker's ``hang_timeout_s``; none when both are None). A worker serves
its requests one at a time, in the order they were sent, so a request's limit
runs from when the worker gets to it: its send, or the reply to the request before
it, whichever is later. Only the request in service (the oldest pending) can run
out of time, and when it does the worker is killed and that request is the one
``expired``: its caller gets ``WorkerCrashed(hung=True)``, everyone queued behind
it ``hung=False`` (they never ran).

The watchdog does not poll at a fixed interval: ``due`` sleeps until the request in
service runs out of time, or until the next idle ping. A send to an idle worker,
or a reply that puts a request with a shorter limit in service, wakes it at once,
so a 1 s limit is acted on within the event loop's latency of that second.

Why queued requests are not timed from their send (full CI runs, 2 cores under
load, test_worker_faults): with each request timed from its send, a small batch
queued behind a hanging record could run out first, the worker was killed with
nobody in service past a limit, and the hanging record was told hung=False each
time until it was dead-lettered as worker-crashed; before that, a queued record
past its own limit when the watchdog woke late was blamed as hung though it never
ran.

Invariants:

- One ``Watchdog`` per started worker, owned by its ``WorkerProcess``: only that
  object records sends and replies here, and only its watchdog task awaits ``due``.
- A request id is pending from its send until its reply or its worker's death.
- An idle worker (nothing pending) is pinged once ``hang_timeout_s / 2`` passed
  without a reply; the ping is a request like any other.
"""

from __future__ import annotations

import asyncio
import math


class Watchdog:
    def __init__(self, hang_timeout_s: float | None) -> None:
        self.hang_timeout_s = hang_timeout_s
        self.expired: set[int] = set()
        # request id -> (loop time of its send, its limit in seconds; inf: none)
        self._pending: dict[int, tuple[float, float]] = {}
        self._pings: set[int] = set()
        self._last_reply = 0.0  # loop time; the worker's ready message is its first reply
        self._wake = asyncio.Event()
        self._sleeping_until = math.inf

    def sent(self, request_id: int, timeout_s: float | None, now: float, *, ping: bool) -> None:
        limit = timeout_s if timeout_s is not None else self.hang_timeout_s
        if ping:
            self._pings.add(request_id)
        self._pending[request_id] = (now, math.inf if limit is None else limit)
        self._wake_if_earlier()

    def answered(self, request_id: object, now: float) -> bool:
        """Record a reply; True when it answered a request (not a ping, not the ready)."""
        self._last_reply = now
        if not isinstance(request_id, int):
            return False
        self._pending.pop(request_id, None)
        self._wake_if_earlier()  # the next request is in service from now
        if request_id in self._pings:
            self._pings.discard(request_id)
            return False
        return True

    def _in_service_deadline(self) -> float:
        """Loop time at which the request in service runs out (inf: none pending, or no limit)."""
        if not self._pending:
            return math.inf
        sent_at, limit = self._pending[self._in_service()]
        return max(sent_at, self._last_reply) + limit

    async def due(self) -> int | None:
        """Wait until something must be done: the id of the request in service that ran
        out of time (kill the worker; the id is added to ``expired``), or None: send a
        ping."""
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            if now >= self._in_service_deadline():
                in_service = self._in_service()
                self.expired.add(in_service)
                return in_service
            if now >= self._ping_at():
                return None
            await self._sleep_until(self._next_wake())

    def _in_service(self) -> int:
        """The oldest pending request: ids grow with each send and a dict keeps the
        order of insertion, so it is the first key."""
        return next(iter(self._pending))

    def _ping_at(self) -> float:
        """Loop time of the next idle ping (inf: requests pending, or no pings)."""
        if self.hang_timeout_s is None or self._pending:
            return math.inf
        return self._last_reply + self.hang_timeout_s / 2

    def _next_wake(self) -> float:
        return min(self._in_service_deadline(), self._ping_at())

    def _wake_if_earlier(self) -> None:
        if self._next_wake() < self._sleeping_until:
            self._wake.set()  # the watchdog sleeps past what is now due first: wake it

    async def _sleep_until(self, when: float) -> None:
        self._sleeping_until = when
        self._wake.clear()
        try:
            async with asyncio.timeout_at(None if math.isinf(when) else when):
                await self._wake.wait()
        except TimeoutError:
            pass
        finally:
            self._sleeping_until = math.inf
