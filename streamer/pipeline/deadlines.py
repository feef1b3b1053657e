"""Deadlines for inference requests, learned from how long batches take.

A worker that hangs (a deadlock, a stuck driver call) is found only by a deadline,
and every hang costs the device that whole deadline. A fixed deadline has to allow
for the slowest legitimate batch on the slowest machine (``worker_timeout_s``,
60 s by default), while a batch on a GPU takes milliseconds. So the engine asks
for a deadline per request::

    timeout_s = clamp(HANG_FACTOR * (expected(n) + ahead), MIN_DEADLINE_S, worker_timeout_s)

* ``expected(n)``: the seconds a batch of ``n`` takes, from the request being sent
  to its reply (device decode, forward pass, pipes). Each batch size keeps an
  exponentially weighted mean (weight ``EWMA_WEIGHT``) of its answered requests.
  A size not measured yet is estimated from the measured sizes ``m``: a smaller
  batch takes no longer, and a larger one at most proportionally longer (the
  fixed cost per batch is amortised), so ``t(m) * max(1, n / m)``; the smallest of
  these bounds is taken.
* ``ahead``: the expected time of the requests already in flight. A worker runs
  its requests one after another, so a request's clock also runs while the ones
  sent before it are served (counted over every device: an overestimate when
  there are several, never an underestimate).
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
from collections import Counter
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
        self._seconds: dict[int, float] = {}  # batch size -> EWMA of answered requests
        self._in_flight: Counter[int] = Counter()  # batch size -> requests awaiting a reply
        self._table: dict[int, float] = {}  # the load-time batch-time table (use_table)

    def expected_s(self, size: int) -> float | None:
        """Seconds a batch of ``size`` is expected to take; None before any measurement."""
        if size in self._seconds:
            return self._seconds[size]
        bounds = [t * max(1.0, size / m) for m, t in self._seconds.items()]
        return min(bounds) if bounds else None

    def use_table(self, table: dict[int, float]) -> None:
        """The batch-time table measured as the model loaded (forward passes on an
        idle machine): the shape of t(b) for ``estimated_s``, never a deadline."""
        self._table = dict(sorted(table.items()))

    def estimated_s(self, size: int) -> float | None:
        """t(size) for choosing batch sizes: the measured time where there is one, else
        the load-time table scaled by how much slower measured requests ran than the
        table says (interpolated between its sizes), else ``expected_s``.

        The table alone is too optimistic while decode and Kafka share the cores; the
        measured sizes alone leave a policy that has only seen one size blind to the
        others (it drained with batches of 32 where 8 was a third faster).
        """
        if size in self._seconds:
            return self._seconds[size]
        table = self._table
        shape = _interpolate(table, size) if table else None
        ratios = [t / table[m] for m, t in self._seconds.items() if table.get(m)]
        if shape is None or not ratios:
            return self.expected_s(size)
        return shape * sum(ratios) / len(ratios)

    def deadline_s(self, size: int) -> float:
        """The deadline for a batch of ``size`` sent now, behind the requests in flight."""
        expected = self.expected_s(size)
        if expected is None:
            return self.ceiling_s
        for m, count in self._in_flight.items():
            expected += count * (self.expected_s(m) or 0.0)
        return min(self.ceiling_s, max(MIN_DEADLINE_S, HANG_FACTOR * expected))

    def observe(self, size: int, seconds: float) -> None:
        previous = self._seconds.get(size)
        self._seconds[size] = (
            seconds if previous is None else previous + EWMA_WEIGHT * (seconds - previous)
        )

    @contextmanager
    def request(self, size: int) -> Iterator[float]:
        """Yield the deadline for one request of ``size``; it counts as in flight until
        the block ends, and its time is measured only if the block ends normally."""
        timeout_s = self.deadline_s(size)
        self._in_flight[size] += 1
        started = self._clock()
        try:
            yield timeout_s
        finally:
            self._in_flight[size] -= 1
            if not self._in_flight[size]:
                del self._in_flight[size]
        self.observe(size, self._clock() - started)


def _interpolate(table: dict[int, float], size: int) -> float | None:
    """t(size) from a table of sizes (sorted), linear between the two around it."""
    below = [(b, t) for b, t in table.items() if b <= size]
    above = [(b, t) for b, t in table.items() if b >= size]
    if not below or not above:
        return None
    (b0, t0), (b1, t1) = below[-1], above[0]
    return t0 if b1 == b0 else t0 + (t1 - t0) * (size - b0) / (b1 - b0)
