"""How big a batch is and how long it waits to fill: fixed, or driven by a latency target.

The ``Batcher`` asks its policy two questions for the batch it is filling: how
many records it may hold (``size_limit``), and how long its oldest record may
wait for more (``fill_wait_s``). ``FixedPolicy`` answers with the settings
(``max_batch_size``, ``max_batch_delay_ms``), the behaviour without a target.

``LatencyTargetPolicy`` answers from a p99 end-to-end target (``latency_target_ms``),
the batch-time table ``t(b)`` (``BatchTimes``: the time the inference worker itself
spends on a batch, measured while serving, shaped by the table it measured as it
loaded) and the backlog (records already on their way to the batcher, i.e. being
decoded):

1. **Lag: drain.** When the queued records plus the backlog fill a batch of
   ``max_batch_size``, throughput matters more than the wait of any one record:
   the batch is the most efficient size the table knows (the largest, unless a
   smaller measured size has a clearly higher ``b / t(b)``) and waits only for
   records that are already coming.
2. **Steady state: small, within the budget, but keep up.** Otherwise a record's
   latency is roughly its fill wait, the batch running ahead of it on the device,
   and its own batch: ``fill + 2 t(b)`` must fit the budget. The size is the
   smallest ``b`` that is about as efficient as any (``best_batch_size``: within 5%
   of the best ``b / t(b)``; a larger batch would add latency and buy almost no
   throughput), or the largest ``b`` with ``2 t(b) <= budget`` if that is smaller.
   Batches that small must still keep up with the arrival rate
   (``workers x b / t(b) >= KEEP_UP x rate``, the rate counted over the last
   ``RATE_WINDOW_S``, with ``workers`` inference workers running batches side by
   side); if they cannot, the size is the smallest that can, or when none can,
   the smallest about as efficient as any (``best_batch_size``): near capacity
   the queue decides latency, and that size serves it almost as fast as any with
   the shortest batches. (It was the drain size, the largest: at 90% of the drain
   peak no size had 20% to spare, and in a benchmark (docs/BENCHMARKS.md) a batch of
   20 ran 0.84 s and p99 was 0.96 s.) Under lag, step 1 drains.
   Records already queued beyond that size may join the batch, up to the most
   efficient size: they have waited already (the ``Batcher`` asks again when a
   batch slot frees, with what queued meanwhile counted). The fill wait is what is
   left of the budget, ``budget - 2 t(b)``, never more than ``max_batch_delay_ms``
   (waiting longer than that buys no throughput at a steady rate below capacity).
3. **Correct from what is observed (AIMD, as Clipper does).** The budget is
   ``target x factor``. Every ``ADJUST_EVERY`` latencies observed in steady
   state, the p99 of the last ``WINDOW`` is compared with the target: above it,
   the factor is cut by ``DECREASE``; below it, it grows by ``INCREASE`` up to 1.
   Latencies observed while lagging, and those of records that reached the
   service later than the target (a backlog left while it was down or starting),
   are queueing the policy cannot help, and do not count.

The policy is pure logic over an injected ``t(b)`` and clock: tests drive it with
a fake table. Its state is owned by the engine's event loop; nothing else changes it.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable
from typing import Protocol

from streamer.pipeline.deadlines import SecondsBySize

log = logging.getLogger(__name__)

BatchTime = Callable[[int], float | None]  # t(b): seconds a batch of b takes; None: unknown

WINDOW = 512
ADJUST_EVERY = 64
DECREASE = 0.8
INCREASE = 0.05
MIN_FACTOR = 0.2
BETTER_BY = 1.05  # a smaller batch drains only if its measured throughput is this much higher
KEEP_UP = 1.2  # steady-state batches must serve 1.2x the arrival rate
RATE_WINDOW_S = 2.0


class BatchPolicy(Protocol):
    def arrived(self, now: float) -> None: ...

    def size_limit(self, queued: int, backlog: int) -> int: ...

    def fill_wait_s(self, queued: int, backlog: int) -> float: ...


def timed_sizes(max_batch_size: int) -> tuple[int, ...]:
    """The batch sizes timed when the model loads: 1, 2, 4, ... and ``max_batch_size``."""
    sizes = {max_batch_size}
    size = 1
    while size < max_batch_size:
        sizes.add(size)
        size *= 2
    return tuple(sorted(sizes))


def best_batch_size(batch_seconds: dict[int, float], within: float = 0.05) -> int:
    """The smallest batch size whose images/s is within ``within`` of the best in the
    table: the throughput of the best, with less waiting to fill and less latency."""
    rates = {size: size / t for size, t in batch_seconds.items() if t > 0}
    if not rates:  # nothing measurable (a model that does no work): the largest
        return max(batch_seconds)
    best = max(rates.values())
    return min(size for size, rate in rates.items() if rate >= (1 - within) * best)


class BatchTimes:
    """t(b) for choosing batch sizes: seconds the inference worker spends on a batch.

    Measured on the worker's own clock (``BatchResult.handled_s``: gathering the
    rows, decoding on the device, the forward pass), not as the request's round
    trip: with two batches in flight per device the second one's round trip
    includes the first one's turn, and a policy that read round trips
    believed the device half as fast as it was (a benchmark at 90% of
    peak: it gave up on the budget and drained with batches of 8, p99 1.16 s where
    batches of 4 without a target kept p99 at 0.65 s).

    A size measured gives its own time; another size takes the shape of the
    load-time table (``use_table``: forward passes on an idle machine), scaled by how
    much slower the measured sizes ran than the table says, interpolated between its
    sizes. The table alone is too optimistic while decode and Kafka share the cores;
    the measured sizes alone would leave a policy that has seen one size blind to the
    others. Beyond the table, or without one, ``SecondsBySize.estimate`` bounds it.

    Owned by the engine, on its event loop: it observes every answered batch.
    """

    def __init__(self) -> None:
        self._seconds = SecondsBySize()
        self._table: dict[int, float] = {}

    def use_table(self, table: dict[int, float]) -> None:
        self._table = dict(sorted(table.items()))

    def observe(self, size: int, seconds: float) -> None:
        self._seconds.observe(size, seconds)

    def estimated_s(self, size: int) -> float | None:
        """t(size); None before any batch was measured (a table alone is not trusted)."""
        measured = self._seconds.measured
        if size in measured:
            return measured[size]
        table = self._table
        shape = _interpolate(table, size) if table else None
        ratios = [t / table[m] for m, t in measured.items() if table.get(m)]
        if shape is None or not ratios:
            return self._seconds.estimate(size)
        return shape * sum(ratios) / len(ratios)


def _interpolate(table: dict[int, float], size: int) -> float | None:
    """t(size) from a table of sizes (sorted), linear between the two around it."""
    below = [(b, t) for b, t in table.items() if b <= size]
    above = [(b, t) for b, t in table.items() if b >= size]
    if not below or not above:
        return None
    (b0, t0), (b1, t1) = below[-1], above[0]
    return t0 if b1 == b0 else t0 + (t1 - t0) * (size - b0) / (b1 - b0)


class FixedPolicy:
    """``max_batch_size`` records, or whatever came within ``max_batch_delay_ms``."""

    def __init__(self, max_batch_size: int, max_delay_s: float) -> None:
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s

    def arrived(self, now: float) -> None:
        pass

    def size_limit(self, queued: int, backlog: int) -> int:
        return self.max_batch_size

    def fill_wait_s(self, queued: int, backlog: int) -> float:
        return self.max_delay_s


class LatencyTargetPolicy:
    def __init__(
        self,
        target_s: float,
        max_batch_size: int,
        max_delay_s: float,
        batch_time: BatchTime,
        workers: int = 1,
    ) -> None:
        if target_s <= 0:
            raise ValueError("a latency target must be positive")
        self.target_s = target_s
        self.workers = workers  # inference workers, each running its own batch
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self._t = batch_time
        self.factor = 1.0
        self._latencies: deque[float] = deque(maxlen=WINDOW)
        self._since_adjust = 0
        self.p99_s: float | None = None
        self.chosen_size = max_batch_size  # the last size limit handed out, for the gauge
        self._arrivals: deque[float] = deque()  # submit times within RATE_WINDOW_S

    @property
    def budget_s(self) -> float:
        return self.target_s * self.factor

    @property
    def headroom_s(self) -> float | None:
        """Target minus the observed p99 (negative: the target is missed)."""
        return None if self.p99_s is None else self.target_s - self.p99_s

    def arrived(self, now: float) -> None:
        """One record reached the batcher at ``now`` (seconds, the batcher's clock)."""
        self._arrivals.append(now)
        while self._arrivals and self._arrivals[0] < now - RATE_WINDOW_S:
            self._arrivals.popleft()

    @property
    def rate_per_s(self) -> float:
        return len(self._arrivals) / RATE_WINDOW_S

    def lagging(self, queued: int, backlog: int) -> bool:
        return queued + backlog >= self.max_batch_size

    def size_limit(self, queued: int, backlog: int) -> int:
        """Under lag, the drain size. Otherwise the budget's size (``_budget_size``),
        or more when more records are already queued, up to the most efficient size:
        they have waited already, and a batch of them runs about as fast per record
        as any, where the budget's size would leave the rest queued behind it."""
        if self.lagging(queued, backlog):
            size = self._drain_size()
        else:
            size = max(self._budget_size(), min(queued, self._efficient_size()))
        self.chosen_size = size
        return size

    def fill_wait_s(self, queued: int, backlog: int) -> float:
        size = self.size_limit(queued, backlog)
        if self.lagging(queued, backlog):
            # Only records already being decoded are worth waiting for.
            return self.max_delay_s if queued < size else 0.0
        t = self._t(size) or 0.0
        return max(0.0, min(self.max_delay_s, self.budget_s - 2 * t))

    def observe(self, latency_s: float, *, lagging: bool, fetched_after_s: float = 0.0) -> None:
        """One record's end-to-end latency, and how long after it was written it was
        fetched (its time in Kafka); adjusts the budget every ``ADJUST_EVERY``.

        A record that finished while the batcher lagged, or one fetched later than the
        target itself, was delayed by queueing no batch size could help (a backlog
        left while the service was down or starting, or one it is draining): it does
        not count. In a benchmark the 600 records preloaded before the
        service started reached it 36-38 s late, and the policy, counting them, cut
        its budget to the floor (batches of 1) for the first minute of the steady
        phase that followed.
        """
        if lagging or fetched_after_s > self.target_s:
            return
        self._latencies.append(latency_s)
        self._since_adjust += 1
        if self._since_adjust < ADJUST_EVERY:
            return
        self._since_adjust = 0
        ordered = sorted(self._latencies)
        self.p99_s = ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]
        if self.p99_s > self.target_s:
            self.factor = max(MIN_FACTOR, self.factor * DECREASE)
        else:
            self.factor = min(1.0, self.factor + INCREASE)
        t = self.batch_time_s(self.chosen_size)
        log.debug(
            "latency target p99_s=%.3f target_s=%.3f factor=%.2f size=%d t_s=%s rate_per_s=%.1f",
            self.p99_s,
            self.target_s,
            self.factor,
            self.chosen_size,
            "unknown" if t is None else f"{t:.4f}",
            self.rate_per_s,
        )

    def batch_time_s(self, size: int) -> float | None:
        """t(size) as the policy sees it (the injected table); None: unknown."""
        return self._t(size)

    def _budget_size(self) -> int:
        """The smallest batch about as efficient as any (``best_batch_size`` over t(b)),
        or a smaller one when the budget needs it (the largest with ``2 t(b) <= budget``,
        at least 1); then grown to the smallest size that keeps up with the arrival
        rate (``workers`` batches at a time) with the ``KEEP_UP`` margin, or, when none
        does, the smallest about as efficient as any (``best_batch_size``)."""
        fits = 1
        for size in range(self.max_batch_size, 1, -1):
            t = self._t(size)
            if t is None or 2 * t <= self.budget_s:
                fits = size
                break
        efficient = self._efficient_size()
        needed = KEEP_UP * self.rate_per_s
        for size in range(min(fits, efficient), self.max_batch_size + 1):
            t = self._t(size)
            if t is None or self.workers * size / t >= needed:
                return size
        return efficient

    def _efficient_size(self) -> int:
        """``best_batch_size`` over the sizes the table knows (the largest if none)."""
        known = {}
        for size in range(1, self.max_batch_size + 1):
            t = self._t(size)
            if t is not None:
                known[size] = t
        return best_batch_size(known) if known else self.max_batch_size

    def _drain_size(self) -> int:
        """The most efficient size the table knows: the largest unless a smaller one is
        clearly faster per record (unknown sizes count as no faster)."""
        largest = self.max_batch_size
        t_largest = self._t(largest)
        if t_largest is None:
            return largest
        best, best_rate = largest, largest / t_largest
        for size in range(largest - 1, 0, -1):
            t = self._t(size)
            if t and size / t > best_rate * BETTER_BY:
                best, best_rate = size, size / t
        return best
