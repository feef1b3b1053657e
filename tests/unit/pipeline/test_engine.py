"""Engine logic with stand-in pools: crash isolation, retries and their stage, device statistics."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from streamer.config import Settings
from streamer.errors import DecodeError, InferenceFailed, RetriesExhausted, WorkerCrashed
from streamer.metrics import Metrics
from streamer.pipeline import batch_policy
from streamer.pipeline.batch_policy import LatencyTargetPolicy
from streamer.pipeline.engine import _CPU_DECODE, Engine, _BatchItem
from streamer.vision.classifier import BatchEntry, BatchResult
from streamer.workers import codec

pytestmark = pytest.mark.timeout(10)

POISON = 13


class CrashingPool:
    """Stands in for the inference pool: any batch containing POISON 'kills the worker'."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    async def submit(self, request: codec.Request, timeout_s: float | None = None) -> Any:
        slots = request.body
        self.batches.append(list(slots))
        if POISON in slots:
            raise WorkerCrashed("inference", -9)
        return BatchResult([[s] for s in slots], [[1.0] for _ in slots], 0.01)


async def test_innocent_records_get_results_and_only_the_culprit_fails() -> None:
    engine = Engine(Settings(weights="random:0", device="cpu"), Metrics())
    pool = CrashingPool()
    engine.inference = pool  # type: ignore[assignment]
    slots = [10, 11, 12, 13, 14, 15, 16, 17]

    results = await engine._infer(slots)

    assert len(results) == len(slots)
    for slot, result in zip(slots, results, strict=True):
        if slot == POISON:
            assert isinstance(result, WorkerCrashed)
        else:
            assert isinstance(result, _BatchItem) and result.indices == [slot]
    # The culprit ends up alone; the halves without it ran once each.
    assert [POISON] in pool.batches
    assert sum(1 for b in pool.batches if POISON not in b) == 3  # [10..11], [14..17], [12]
    assert len(pool.batches) == 1 + 2 + 2 + 2


async def test_a_batch_without_a_crash_runs_once() -> None:
    engine = Engine(Settings(weights="random:0", device="cpu"), Metrics())
    pool = CrashingPool()
    engine.inference = pool  # type: ignore[assignment]
    results = await engine._infer([1, 2, 3])
    assert pool.batches == [[1, 2, 3]]
    assert all(isinstance(r, _BatchItem) and r.batch_size == 3 for r in results)


class CudaPool:
    """Stands in for an inference worker on a GPU: its replies carry device statistics."""

    async def submit(self, request: codec.Request, timeout_s: float | None = None) -> Any:
        slots = request.body
        return BatchResult(
            [[s] for s in slots],
            [[1.0] for _ in slots],
            0.01,
            "cuda:1",
            device_memory_bytes=123_456_789,
            device_utilization=0.87,
        )


async def test_gpu_memory_and_utilisation_reported_by_the_worker_are_exported() -> None:
    metrics = Metrics()
    engine = Engine(Settings(weights="random:0", device="cpu"), metrics)
    engine.inference = CudaPool()  # type: ignore[assignment]
    await engine._infer([1, 2])
    assert metrics.gpu_memory.labels("cuda:1")._value.get() == 123_456_789
    assert metrics.gpu_utilization.labels("cuda:1")._value.get() == 0.87


async def test_cpu_batches_export_no_gpu_series() -> None:
    metrics = Metrics()
    engine = Engine(Settings(weights="random:0", device="cpu"), metrics)
    engine.inference = CrashingPool()  # type: ignore[assignment]
    await engine._infer([1, 2])
    assert metrics.registry.get_sample_value("streamer_gpu_memory_bytes", {"device": "cpu"}) is None


class DyingDecoders:
    """Stands in for the decode pool: the worker dies on every request."""

    async def submit(self, request: Any) -> Any:
        raise WorkerCrashed("decode", -11)


class Decoders:
    async def submit(self, request: Any) -> Any:
        return 0.001, 0  # (decode seconds, orientation)


class Batches:
    """Stands in for the batcher: answers each entry with the next of ``results``.

    Like the real one, a crash or a bad image is the entry's result, while a batch
    that raised (``InferenceFailed``) raises from ``submit``.
    """

    def __init__(self, *results: Any) -> None:
        self.results = list(results)

    async def submit(self, entry: Any) -> Any:
        result = self.results.pop(0)
        if isinstance(result, InferenceFailed):
            raise result
        return result


def engine_with(decoders: Any, batches: Any, attempts: int = 3) -> Engine:
    engine = Engine(
        Settings(weights="random:0", device="cpu", max_record_attempts=attempts), Metrics()
    )
    engine.decode = decoders
    engine._batcher = batches
    return engine


async def test_a_decode_worker_that_keeps_dying_is_dead_lettered_at_the_decode_stage() -> None:
    engine = engine_with(DyingDecoders(), Batches())
    with pytest.raises(RetriesExhausted) as caught:
        await engine._classify_slot(0, 10)
    error = caught.value
    assert (error.stage, error.reason, error.attempts) == ("decode", "worker-crashed", 3)


async def test_an_inference_worker_that_keeps_dying_is_dead_lettered_at_the_inference_stage() -> (
    None
):
    crashed = WorkerCrashed("inference", -9)
    engine = engine_with(Decoders(), Batches(crashed, crashed), attempts=2)
    with pytest.raises(RetriesExhausted) as caught:
        await engine._classify_slot(0, 10)
    error = caught.value
    assert (error.stage, error.reason, error.attempts) == ("inference", "worker-crashed", 2)


async def test_a_failing_batch_is_inference_failed_at_the_inference_stage() -> None:
    failed = InferenceFailed("CUDA error")
    engine = engine_with(Decoders(), Batches(failed, failed), attempts=2)
    with pytest.raises(RetriesExhausted) as caught:
        await engine._classify_slot(0, 10)
    assert (caught.value.stage, caught.value.reason) == ("inference", "inference-failed")


class FallbackDecoders:
    """Defers the JPEG to the device first; its CPU decode (``defer_jpeg=False``) finds it bad."""

    async def submit(self, request: Any) -> Any:
        if request[2]:
            return 0.001, 1
        raise DecodeError("cut short", reason="truncated")


async def test_a_bad_image_found_after_a_crash_counts_both_attempts() -> None:
    # The device cannot decode it; the CPU fallback (not an attempt) finds it bad.
    engine = engine_with(FallbackDecoders(), Batches(WorkerCrashed("inference", -9), _CPU_DECODE))
    engine.device_jpeg = True
    with pytest.raises(DecodeError) as caught:
        await engine._classify_slot(0, 10)
    assert caught.value.attempts == 2 and caught.value.stage == "decode"


def test_the_batch_time_table_sets_the_batch_size_but_not_the_deadlines() -> None:
    engine = Engine(Settings(weights="random:0", device="cpu", max_batch_size=32), Metrics())
    engine.use_batch_table({1: 0.01, 8: 0.02, 16: 0.0405, 32: 0.081})
    assert engine.policy.size_limit(queued=100, backlog=100) == 8
    assert engine.deadlines.expected_s(16) is None  # idle-machine times: too optimistic


class QueuedPool:
    """Stands in for an inference worker that spends ``forward_s`` on each batch while
    the request's round trip is longer: it waited behind the batch ahead of it."""

    def __init__(self, handled_s: float, round_trip_s: float) -> None:
        self.handled_s = handled_s
        self.round_trip_s = round_trip_s

    async def submit(self, request: codec.Request, timeout_s: float | None = None) -> Any:
        slots = request.body
        await asyncio.sleep(self.round_trip_s)  # the batch ahead's turn, then this one's
        scores = [[1.0] for _ in slots]
        forward_s = self.handled_s * 0.9  # the rest: gathering rows, device decode
        return BatchResult([[s] for s in slots], scores, forward_s, handled_s=self.handled_s)


async def test_the_latency_target_sees_the_worker_s_own_batch_time_not_the_round_trip() -> None:
    """A benchmark at 90% of peak: the policy learned t(b) from
    request round trips, which with two batches in flight per device include the one
    ahead's turn. It believed the device half as fast, gave up on the budget and
    drained with batches of 8: p99 1.16 s, where batches of 4 without a target kept
    0.65 s. The worker's own time is what a batch costs the device."""
    settings = Settings(weights="random:0", device="cpu", latency_target_ms=500)
    engine = Engine(settings, Metrics())
    engine.use_batch_table({1: 0.010, 2: 0.016, 4: 0.030})
    engine.inference = QueuedPool(handled_s=0.036, round_trip_s=0.2)  # type: ignore[assignment]
    await engine._infer([1, 2, 3, 4])
    assert isinstance(engine.policy, LatencyTargetPolicy)
    assert engine.policy.batch_time_s(4) == pytest.approx(0.036)
    # Sizes not run yet: the table's shape, 1.2x slower as measured.
    assert engine.policy.batch_time_s(2) == pytest.approx(0.016 * 1.2)
    # The hang deadlines still learn the round trip (a request waits behind others).
    assert engine.deadlines.expected_s(4) is not None and engine.deadlines.expected_s(4) >= 0.2


def test_records_that_reach_the_service_already_late_do_not_correct_the_latency_target() -> None:
    """In a benchmark, records preloaded before the service started reached it
    36-38 s late; counted, they cut the budget to the floor (batches of 1) for the
    first minute of the steady phase that followed."""
    settings = Settings(weights="random:0", device="cpu", latency_target_ms=500)
    engine = Engine(settings, Metrics())
    assert isinstance(engine.policy, LatencyTargetPolicy)
    for _ in range(4 * batch_policy.ADJUST_EVERY):  # a backlog: 37 s of it in Kafka
        engine.observe_latency(38.0, fetched_after_s=37.0)
    assert engine.policy.factor == 1.0 and engine.policy.p99_s is None
    for _ in range(batch_policy.ADJUST_EVERY):  # late because of the service: counted
        engine.observe_latency(0.9, fetched_after_s=0.1)
    assert engine.policy.factor < 1.0 and engine.policy.p99_s == pytest.approx(0.9)


def test_with_batch_size_from_table_off_max_batch_size_stays() -> None:
    settings = Settings(weights="random:0", device="cpu", batch_size_from_table=False)
    engine = Engine(settings, Metrics())
    engine.use_batch_table({1: 0.01, 8: 0.02, 16: 0.0405, 32: 0.081})
    assert engine.policy.size_limit(queued=100, backlog=100) == 32


class HeldPool:
    """Stands in for an inference worker that holds every batch until released."""

    def __init__(self) -> None:
        self.held = 0
        self.sent = asyncio.Event()  # set on every batch received
        self.release = asyncio.Event()

    async def submit(self, request: codec.Request, timeout_s: float | None = None) -> Any:
        entries: list[BatchEntry] = request.body
        self.held += 1
        self.sent.set()
        await self.release.wait()
        return BatchResult([[e.slot] for e in entries], [[1.0] for _ in entries], 0.01)


@pytest.mark.parametrize(("per_worker", "workers"), [(2, 1), (3, 1), (2, 2)])
async def test_batches_in_flight_per_device_bounds_the_batches_sent_before_one_returns(
    per_worker: int, workers: int
) -> None:
    """Each CPU inference worker counts as a device: ``workers`` of them take that many
    times the batches."""
    in_flight = per_worker * workers
    settings = Settings(
        weights="random:0",
        device="cpu",
        max_batch_size=1,
        batch_size_from_table=False,
        batches_in_flight_per_device=per_worker,
        cpu_inference_workers=workers,
    )
    engine = Engine(settings, Metrics())
    pool = HeldPool()
    engine.inference = pool  # type: ignore[assignment]
    batcher = engine._new_batcher()
    await batcher.start()
    try:
        entries = [BatchEntry(slot, 0, 1) for slot in range(in_flight + 2)]
        answers = [asyncio.ensure_future(batcher.submit(e)) for e in entries]
        async with asyncio.timeout(5):
            while pool.held < in_flight:
                pool.sent.clear()
                await pool.sent.wait()
        for _ in range(100):  # many loop turns: no further batch is sent while they are held
            await asyncio.sleep(0)
        assert pool.held == in_flight
        pool.release.set()
        async with asyncio.timeout(5):
            results = await asyncio.gather(*answers)
        assert [r.indices for r in results] == [[e.slot] for e in entries]
        assert pool.held == len(entries)
    finally:
        await batcher.stop()
