"""Hangs cost a bounded, learned deadline: the engine's deadline choice and the cost of
a record that hangs the inference worker, on a simulated clock with a stand-in pool."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest

from streamer.config import Settings
from streamer.errors import RecordError, WorkerCrashed, WorkerHung
from streamer.metrics import Metrics
from streamer.pipeline.deadlines import HANG_FACTOR, MIN_DEADLINE_S, BatchDeadlines
from streamer.pipeline.engine import Engine, _BatchItem
from streamer.vision.classifier import BatchEntry, BatchResult
from streamer.workers import codec

pytestmark = pytest.mark.timeout(10)

HOSTILE = 99  # the slot of a record that makes the inference worker hang
POOL_DEFAULT_TIMEOUT_S = 60.0  # the pool's own deadline when the engine gives none


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class SimulatedPool:
    """Stands in for the inference pool on a simulated clock.

    A batch of n takes ``seconds(n)``. A batch holding HOSTILE is never answered: it
    waits out its deadline (the pool's 60 s when the engine passes none) and fails
    as hung, as the real pool's watchdog makes it.
    """

    def __init__(self, clock: Clock, seconds: Any = lambda n: 0.05 + 0.01 * n) -> None:
        self.clock = clock
        self.seconds = seconds
        self.requests: list[tuple[int, float | None]] = []  # (batch size, timeout_s)
        self.hangs = 0
        self.hung_s = 0.0  # simulated time the device spent waiting on hangs

    async def submit(self, request: codec.Request, timeout_s: float | None = None) -> Any:
        entries: list[BatchEntry] = request.body
        self.requests.append((len(entries), timeout_s))
        if any(e.slot == HOSTILE for e in entries):
            waited = POOL_DEFAULT_TIMEOUT_S if timeout_s is None else timeout_s
            self.clock.now += waited
            self.hangs += 1
            self.hung_s += waited
            raise WorkerCrashed("inference", -9, hung=True)
        self.clock.now += self.seconds(len(entries))
        return BatchResult([[e.slot] for e in entries], [[1.0] for _ in entries], 0.01)


def engine_on(clock: Clock, pool: SimulatedPool, **overrides: Any) -> Engine:
    settings = Settings(weights="random:0", device="cpu", **overrides)
    engine = Engine(settings, Metrics())
    engine.inference = pool  # type: ignore[assignment]
    engine.deadlines = BatchDeadlines(settings.worker_timeout_s, clock=clock)
    return engine


def entries(n: int, first: int = 0) -> list[BatchEntry]:
    return [BatchEntry(first + k) for k in range(n)]


async def test_the_deadline_is_the_ceiling_at_cold_start_then_learned_from_batch_times() -> None:
    clock = Clock()
    pool = SimulatedPool(clock, seconds=lambda n: 0.2 * n)  # a slow CPU: 1.6 s for 8
    engine = engine_on(clock, pool, worker_timeout_s=60.0)

    await engine._infer(entries(8))  # nothing measured yet
    await engine._infer(entries(8))  # 1.6 s measured for 8
    await engine._infer(entries(16))  # not measured: at most twice as long as 8
    await engine._infer(entries(2))  # not measured: no longer than 8
    await engine._infer(entries(64))  # 10 x 12.8 s is above the ceiling

    timeouts = [t for _, t in pool.requests]
    assert timeouts == pytest.approx([60.0, 16.0, 32.0, 16.0, 60.0])


async def test_fast_batches_get_the_floor_and_a_lower_ceiling_wins() -> None:
    clock = Clock()
    pool = SimulatedPool(clock, seconds=lambda n: 0.01)  # a GPU
    engine = engine_on(clock, pool, worker_timeout_s=60.0)
    for _ in range(3):
        await engine._infer(entries(32))
    assert [t for _, t in pool.requests] == pytest.approx([60.0, MIN_DEADLINE_S, MIN_DEADLINE_S])

    deadlines = BatchDeadlines(2.0, clock=clock)
    deadlines.observe(32, 0.01)
    assert deadlines.deadline_s(32) == 2.0  # a ceiling below the floor is still the ceiling


def test_a_request_s_deadline_is_its_own_and_only_answered_ones_are_measured() -> None:
    """The watchdog times a request from when the worker gets to it, so a request sent
    behind another gets its own size's deadline, not one stretched by the other's."""
    clock = Clock()
    deadlines = BatchDeadlines(600.0, clock=clock)
    deadlines.observe(10, 1.0)
    with deadlines.request(10) as first:
        with deadlines.request(10) as second:
            clock.now += 2.0
        assert (first, second) == pytest.approx((HANG_FACTOR * 1.0, HANG_FACTOR * 1.0))
    # Each took 2 s: the mean moves a fifth of the way from 1 s, twice.
    assert deadlines.expected_s(10) == pytest.approx(1.0 + 0.2 + 0.2 * (2.0 - 1.2))

    with pytest.raises(WorkerCrashed), deadlines.request(10):
        clock.now += 500.0
        raise WorkerCrashed("inference", -9, hung=True)
    assert deadlines.expected_s(10) == pytest.approx(1.36)  # the hang taught it nothing
    assert deadlines.deadline_s(10) == pytest.approx(13.6)  # and nothing is in flight now


class LoadedBatcher:
    """Stands in for the batcher under load: every entry joins a full batch of
    ``size`` with fresh innocent records (the worst case for a hostile record)."""

    def __init__(self, engine: Engine, size: int) -> None:
        self.engine = engine
        self.size = size
        self.submits = 0
        self.innocent: list[Any] = []  # the results of the innocent records

    async def submit(self, entry: BatchEntry) -> Any:
        self.submits += 1
        fillers = entries(self.size - 1, first=1000 * self.submits)
        batch = [*fillers[: self.size // 3], entry, *fillers[self.size // 3 :]]
        results = await self.engine._infer(batch)
        self.innocent += [r for e, r in zip(batch, results, strict=True) if e is not entry]
        return results[batch.index(entry)]


async def test_a_record_that_hangs_the_worker_costs_log2_batch_plus_2_deadlines() -> None:
    """Worst case for one hostile record in a full batch of B (B = 32, 3 attempts):

    before: every attempt joined a new full batch and was isolated by halving again,
    log2(B) + 1 = 6 hangs of 60 s per attempt: 3 x 6 x 60 s = 1,080 s (18 minutes);
    now: log2(B) + 1 hangs while halving once, then 1 alone, each with a learned
    deadline (here the 5 s floor): 7 x 5 s = 35 s, and the record is ``worker-hung``.
    """
    batch, attempts, ceiling = 32, 3, 60.0
    clock = Clock()
    pool = SimulatedPool(clock)
    engine = engine_on(
        clock, pool, max_batch_size=batch, max_record_attempts=attempts, worker_timeout_s=ceiling
    )
    batcher = LoadedBatcher(engine, batch)
    engine._batcher = batcher  # type: ignore[assignment]
    engine.decode = Decoders()  # type: ignore[assignment]
    await engine._infer(entries(batch))  # the service has been running: batch times are known
    pool.requests.clear()

    with pytest.raises(RecordError) as caught:
        await engine._classify_slot(HOSTILE, 10)

    worst_case_hangs = math.ceil(math.log2(batch)) + 2
    assert pool.hangs == worst_case_hangs == 7
    assert pool.hung_s == pytest.approx(worst_case_hangs * MIN_DEADLINE_S)  # 35 s
    old_cost_s = attempts * (math.log2(batch) + 1) * ceiling
    assert old_cost_s == 1080 and pool.hung_s <= old_cost_s / 30
    error = caught.value
    assert isinstance(error, WorkerHung)
    assert (error.reason, error.stage, error.attempts) == ("worker-hung", "inference", 2)
    # The batcher saw the record once; its second run was alone.
    assert batcher.submits == 1 and pool.requests[-1][0] == 1
    assert len(pool.requests) == 1 + 2 * 5 + 1  # the halving, then alone
    # The other 31 records of its batch got their results.
    assert len(batcher.innocent) == batch - 1
    assert all(isinstance(r, _BatchItem) for r in batcher.innocent)


class Decoders:
    async def submit(self, request: Any) -> Any:
        return 0.001, 0


async def test_a_record_that_hangs_alone_once_then_succeeds_is_classified() -> None:
    """One hang (e.g. a driver hiccup) is an attempt, not a verdict."""

    class HangsOnce(SimulatedPool):
        async def submit(self, request: codec.Request, timeout_s: float | None = None) -> Any:
            if self.hangs:
                body = [BatchEntry(1) if e.slot == HOSTILE else e for e in request.body]
                request = dataclasses.replace(request, body=body)
            return await super().submit(request, timeout_s)

    clock = Clock()
    pool = HangsOnce(clock)
    engine = engine_on(clock, pool, max_record_attempts=3)
    engine._batcher = LoadedBatcher(engine, 1)  # type: ignore[assignment]
    engine.decode = Decoders()  # type: ignore[assignment]

    result = await engine._classify_slot(HOSTILE, 10)

    assert result.batch_size == 1 and pool.hangs == 1
    assert engine.metrics.record_retries.labels("inference")._value.get() == 1


async def test_inference_busy_time_counts_answered_batches_only() -> None:
    """``streamer_inference_busy_seconds_total`` adds each answered batch's time; a
    batch that hung the worker is not busy time (the worker was killed and replaced)."""
    clock = Clock()
    engine = engine_on(clock, SimulatedPool(clock), worker_timeout_s=60.0)

    def busy() -> float:
        value = engine.metrics.registry.get_sample_value("streamer_inference_busy_seconds_total")
        assert value is not None
        return value

    assert busy() == 0.0
    await engine._infer(entries(8))
    await engine._infer(entries(8))
    assert busy() == pytest.approx(2 * 0.01)  # SimulatedPool answers forward_s = 0.01

    # It hangs whole and in its half [1, HOSTILE]; [1], [2, 3] are answered, [HOSTILE] hangs.
    results = await engine._infer(
        [BatchEntry(1), BatchEntry(HOSTILE), BatchEntry(2), BatchEntry(3)]
    )
    assert isinstance(results[1], WorkerCrashed)
    assert busy() == pytest.approx(4 * 0.01)

    handled = BatchResult([[0]], [[1.0]], forward_s=0.01, handled_s=0.03)
    engine._items(entries(1), handled, dispatched_at=0.0)
    assert busy() == pytest.approx(4 * 0.01 + 0.03)  # the worker's whole time when measured
