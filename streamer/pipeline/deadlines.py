"""Deadlines for inference requests, learned from how long batches take.

A worker that hangs (a deadlock, a stuck driver call) is found only by a deadline,
and every hang costs the device that whole deadline. A fixed deadline has to allow
for the slowest legitimate batch on the slowest machine (``worker_timeout_s``,
60 s by default), while a batch on a GPU takes milliseconds. So the engine asks
for a deadline per request::

    timeout_s = clamp(HANG_FACTOR * expected(n), MIN_DEADLINE_S, worker_timeout_s)

* ``expected(n)``: the seconds a batch of ``n`` takes, from the request being sent
  to its reply (device decode, forward pass, pipes). Each batch size keeps an
  exponentially weighted mean (weight ``EWMA_WEIGHT``) of its answered requests.
  A size not measured yet is estimated from the measured sizes ``m``: a smaller
  batch takes no longer, and a larger one at most proportionally longer (the
  fixed cost per batch is amortised), so ``t(m) * max(1, n / m)``; the smallest of
  these bounds is taken.
* The requests already in flight are not added: a worker runs its requests one
  after another, and the watchdog starts a request's clock when the worker gets to
  it (``workers.watchdog``). ``expected(n)`` is measured from the send, so it
  includes a wait behind the batch ahead: an overestimate, never an underestimate.
* ``HANG_FACTOR``: how far beyond the expected time a request may run before the
  worker is taken for hung; ten times absorbs noisy neighbours and a cold cache.
* ``MIN_DEADLINE_S``: a floor, so that a GPU's millisecond batches do not turn a
  scheduling hiccup into a kill.

Invariants: a deadline is never above the ceiling (``worker_timeout_s``) and,
unless the ceiling is lower, never below ``MIN_DEADLINE_S``; before any request has
been answered (cold start, e.g. the first batch after the model loaded) it is the
ceiling; only answered requests are measured, so a hang or a crash never teaches
the table anything.

Decode requests keep the pool's fixed deadline: their time depends on the image
(up to ``max_image_pixels``), not on a batch size, so a deadline learned from
typical images would kill workers on legitimate large ones.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

HANG_FACTOR = 10.0
MIN_DEADLINE_S = 5.0
EWMA_WEIGHT = 0.2


class BatchDeadlines:
    """Expected inference time by batch size, and the deadline of the next request."""

    def __init__(self, ceiling_s: float, *, clock: Callable[[], float] = time.perf_counter) -> None:
        self.ceiling_s = ceiling_s
        self._clock = clock
        self._seconds = SecondsBySize()  # of answered requests, sent to reply

    def expected_s(self, size: int) -> float | None:
        """Seconds a batch of ``size`` is expected to take; None before any measurement."""
        return self._seconds.estimate(size)

    def deadline_s(self, size: int) -> float:
        """The time a batch of ``size`` may take once the worker gets to it."""
        expected = self.expected_s(size)
        if expected is None:
            return self.ceiling_s
        return min(self.ceiling_s, max(MIN_DEADLINE_S, HANG_FACTOR * expected))

    def observe(self, size: int, seconds: float) -> None:
        self._seconds.observe(size, seconds)

    @contextmanager
    def request(self, size: int) -> Iterator[float]:
        """Yield the deadline for one request of ``size``; its time is measured only if
        the block ends normally (a hang or a crash teaches the table nothing)."""
        started = self._clock()
        yield self.deadline_s(size)
        self.observe(size, self._clock() - started)


class SecondsBySize:
    """How long a batch of each size takes: an exponentially weighted mean per size
    measured, and for a size not measured the smallest bound ``t(m) * max(1, n / m)``
    (module docstring). Owned by whoever measures; nothing else changes it."""

    def __init__(self) -> None:
        self.measured: dict[int, float] = {}  # batch size -> EWMA of its times

    def observe(self, size: int, seconds: float) -> None:
        previous = self.measured.get(size)
        self.measured[size] = (
            seconds if previous is None else previous + EWMA_WEIGHT * (seconds - previous)
        )

    def estimate(self, size: int) -> float | None:
        """Seconds a batch of ``size`` takes; None before any measurement."""
        if size in self.measured:
            return self.measured[size]
        bounds = [t * max(1.0, size / m) for m, t in self.measured.items()]
        return min(bounds) if bounds else None
