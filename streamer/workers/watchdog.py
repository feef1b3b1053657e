"""The watchdog's bookkeeping for one worker: request deadlines and idle pings.

Every request may carry its own deadline (``WorkerProcess.call(body, timeout_s)``,
else the worker's ``hang_timeout_s``; none when both are None). The watchdog
does not poll at a fixed interval: ``due`` sleeps until the earliest pending
deadline, or the next idle ping, and a request whose deadline comes before the
one it sleeps towards wakes it at once. A 1 s deadline is therefore acted on
within the event loop's latency of that second, whatever the other deadlines.

Invariants:

- One ``Watchdog`` per started worker, owned by its ``WorkerProcess``: only that
  object records sends and replies here, and only its watchdog task awaits ``due``.
- A request id has a deadline from its send until its reply or its worker's death.
- A worker serves its requests one at a time, in the order they were sent, so only
  the oldest pending request can be what hangs it. ``expired`` names that request
  when its deadline ran out before the kill; its caller gets
  ``WorkerCrashed(hung=True)``, everyone else ``hung=False``. A request queued
  behind it may pass its own deadline too (the event loop late under load, deadlines
  at the same floor), but it never ran: blaming it would dead-letter an innocent
  record as worker-hung.
- An idle worker (nothing pending) is pinged once ``hang_timeout_s / 2`` passed
  without a reply; the ping has a deadline like any request.
"""

from __future__ import annotations

import asyncio
import math


class Watchdog:
    def __init__(self, hang_timeout_s: float | None) -> None:
        self.hang_timeout_s = hang_timeout_s
        self.expired: set[int] = set()
        self._deadlines: dict[int, float] = {}  # request id -> loop time of its deadline
        self._pings: set[int] = set()
        self._last_reply = 0.0  # loop time; the worker's ready message is its first reply
        self._wake = asyncio.Event()
        self._sleeping_until = math.inf

    def sent(self, request_id: int, timeout_s: float | None, now: float, *, ping: bool) -> None:
        limit = timeout_s if timeout_s is not None else self.hang_timeout_s
        if ping:
            self._pings.add(request_id)
        if limit is None:
            return
        at = now + limit
        self._deadlines[request_id] = at
        if at < self._sleeping_until:
            self._wake.set()  # the watchdog sleeps past this deadline: wake it now

    def answered(self, request_id: object, now: float) -> bool:
        """Record a reply; True when it answered a request (not a ping, not the ready)."""
        self._last_reply = now
        if isinstance(request_id, int):
            self._deadlines.pop(request_id, None)
            if request_id in self._pings:
                self._pings.discard(request_id)
                return False
            return True
        return False

    async def due(self) -> list[int] | None:
        """Wait until something must be done: the requests past their deadline (the
        worker must be killed; the one in service among them is added to ``expired``),
        or None: send a ping."""
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            overdue = [rid for rid, at in self._deadlines.items() if at <= now]
            if overdue:
                in_service = min(self._deadlines)  # ids grow with each send
                if in_service in overdue:
                    self.expired.add(in_service)
                return overdue
            wake = min(self._deadlines.values(), default=math.inf)
            if self.hang_timeout_s is not None and not self._deadlines:
                ping_at = self._last_reply + self.hang_timeout_s / 2
                if now >= ping_at:
                    return None
                wake = min(wake, ping_at)
            await self._sleep_until(wake)

    async def _sleep_until(self, when: float) -> None:
        self._sleeping_until = when
        self._wake.clear()
        try:
            async with asyncio.timeout_at(None if math.isinf(when) else when):
                await self._wake.wait()
        except TimeoutError:
            pass
