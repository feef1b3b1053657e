"""Whatever a worker raises, the engine turns it into a dead letter for the record
(a ``RecordError``): no worker error may reach the service and stop it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from streamer.config import Settings
from streamer.errors import (
    ConfigError,
    DecodeError,
    RecordError,
    RetriesExhausted,
    StreamerError,
    WorkerError,
)
from streamer.metrics import Metrics
from streamer.pipeline.batcher import Batcher
from streamer.pipeline.engine import Engine
from streamer.vision.classifier import BatchEntry, BatchResult
from streamer.workers import codec

pytestmark = pytest.mark.timeout(10)


class Decoders:
    def __init__(self, error: StreamerError | None = None) -> None:
        self.error = error
        self.calls = 0

    async def submit(self, request: Any) -> Any:
        self.calls += 1
        if self.error is not None:
            raise self.error
        return 0.001, 0


class FailingPool:
    """Stands in for the inference pool: every batch fails with ``error``."""

    def __init__(self, error: StreamerError | None = None) -> None:
        self.error = error
        self.calls = 0

    async def submit(self, request: codec.Request, timeout_s: float | None = None) -> Any:
        entries: list[BatchEntry] = request.body
        self.calls += 1
        if self.error is not None:
            raise self.error
        return BatchResult([[e.slot] for e in entries], [[1.0] for _ in entries], 0.01)


@pytest.fixture
async def engine() -> AsyncIterator[Engine]:
    engine = Engine(Settings(weights="random:0", device="cpu", max_record_attempts=3), Metrics())
    batcher = Batcher(engine._run_batch, max_batch_size=4, max_batch_delay_ms=1.0)
    engine._batcher = batcher
    await batcher.start()
    yield engine
    await batcher.stop()


NOT_RETRIABLE = [
    pytest.param(
        WorkerError("inference", "CUDA error: misaligned address", retriable=False), id="worker"
    ),
    pytest.param(ConfigError("no CUDA device"), id="config"),
]


@pytest.mark.parametrize("error", NOT_RETRIABLE)
async def test_a_non_retriable_inference_worker_error_is_a_dead_letter_at_once(
    engine: Engine, error: StreamerError
) -> None:
    engine.decode = Decoders()  # type: ignore[assignment]
    engine.inference = pool = FailingPool(error)  # type: ignore[assignment]

    with pytest.raises(RecordError) as caught:
        await engine._classify_slot(0, 10)

    assert isinstance(caught.value, RetriesExhausted) and caught.value.__cause__ is error
    assert (caught.value.reason, caught.value.stage, caught.value.attempts) == (
        "inference-failed",
        "inference",
        1,
    )
    assert pool.calls == 1


@pytest.mark.parametrize("error", NOT_RETRIABLE)
async def test_a_non_retriable_decode_worker_error_is_a_dead_letter_at_the_decode_stage(
    engine: Engine, error: StreamerError
) -> None:
    engine.decode = decoders = Decoders(error)  # type: ignore[assignment]
    engine.inference = FailingPool()  # type: ignore[assignment]

    with pytest.raises(RecordError) as caught:
        await engine._classify_slot(0, 10)

    assert (caught.value.reason, caught.value.stage, caught.value.attempts) == (
        "decode-failed",
        "decode",
        1,
    )
    assert decoders.calls == 1


async def test_a_retriable_worker_error_is_retried_then_dead_lettered(engine: Engine) -> None:
    engine.decode = Decoders()  # type: ignore[assignment]
    engine.inference = pool = FailingPool(WorkerError("inference", "KeyError: 'x'"))  # type: ignore[assignment]

    with pytest.raises(RetriesExhausted) as caught:
        await engine._classify_slot(0, 10)

    assert (caught.value.reason, caught.value.attempts) == ("inference-failed", 3)
    assert pool.calls == 3


async def test_a_record_error_raised_for_a_whole_batch_is_no_one_records_dead_letter(
    engine: Engine,
) -> None:
    engine.decode = Decoders()  # type: ignore[assignment]
    engine.inference = pool = FailingPool(DecodeError("bad", reason="corrupt"))  # type: ignore[assignment]

    with pytest.raises(RetriesExhausted) as caught:
        await engine._classify_slot(0, 10)

    # Retried as an inference failure, not dead-lettered as "corrupt" with its batch.
    assert (caught.value.reason, caught.value.stage, caught.value.attempts) == (
        "inference-failed",
        "inference",
        3,
    )
    assert pool.calls == 3


class PoisonPool:
    """Every batch holding slot ``poison`` fails with a retriable ``WorkerError``."""

    def __init__(self, poison: int) -> None:
        self.poison = poison
        self.batches: list[list[int]] = []

    async def submit(self, request: codec.Request, timeout_s: float | None = None) -> Any:
        slots = [e.slot for e in request.body]
        self.batches.append(slots)
        if self.poison in slots:
            raise WorkerError("inference", "KeyError: 'no such key'")
        return BatchResult([[s] for s in slots], [[1.0] for _ in slots], 0.01)


async def test_a_record_that_makes_the_worker_raise_is_isolated_and_only_it_is_dead_lettered(
    engine: Engine,
) -> None:
    """Without halving on errors, the innocent records batched with the poison one
    fail with it on every attempt and are dead-lettered too."""
    engine.decode = Decoders()  # type: ignore[assignment]
    engine.inference = pool = PoisonPool(poison=2)  # type: ignore[assignment]
    outcomes = await asyncio.gather(
        *(engine._classify_slot(slot, 10) for slot in range(4)), return_exceptions=True
    )
    failed = {slot for slot, o in enumerate(outcomes) if isinstance(o, BaseException)}
    assert failed == {2}
    error = outcomes[2]
    assert isinstance(error, RetriesExhausted)
    assert (error.reason, error.stage, error.attempts) == ("inference-failed", "inference", 3)
    assert [o.indices for o in outcomes if not isinstance(o, BaseException)] == [[0], [1], [3]]
    assert pool.batches.count([2]) == 3  # alone once per attempt, after the first halving
