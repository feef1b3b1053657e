"""A worker reply that does not fit its request costs the worker, never the service.

Real spawned workers (``tests.unit.codec_workers``) answer like honest ones, except
for the request that holds slot ``POISON``: its reply is what a compromised worker
could send. Whatever that reply holds, the engine gives the other records their
results, the poison record ends as a dead letter whose reason and stage come from
the fixed sets (``worker-crashed`` once the worker was killed on every attempt), the
broken worker is replaced, and no record is left waiting.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiokafka import ConsumerRecord

from streamer.config import Settings
from streamer.errors import (
    DEAD_LETTER_REASONS,
    STAGES,
    RecordError,
    RetriesExhausted,
    WorkerCrashed,
)
from streamer.kafka.records import dead_letter_headers
from streamer.metrics import Metrics
from streamer.pipeline.batcher import Batcher
from streamer.pipeline.decode_chunks import DecodeChunks
from streamer.pipeline.engine import Engine
from streamer.workers import pool as pool_module
from streamer.workers.pool import WorkerPool
from tests.unit import codec_workers
from tests.unit.codec_workers import POISON

pytestmark = pytest.mark.timeout(120)

ATTEMPTS = 2
DEADLINE_S = 60  # every case settles well within it; a record left waiting never does


@pytest.fixture(autouse=True)
def quick_respawn(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each poison reply kills a worker: respawn without the backoff's waits."""
    monkeypatch.setattr(pool_module, "RESPAWN_BACKOFF_S", (0.0,))


async def scripted_pool(
    kind: str, target: Callable[..., None], corrupt: codec_workers.Corrupt
) -> WorkerPool:
    pool = WorkerPool(kind, 1, target, lambda i: (corrupt,), Metrics(), start_timeout_s=60)
    await pool.start()
    return pool


class Decoders:
    """Stands in for the decode stage: every payload decodes."""

    async def submit(self, request: Any) -> Any:
        return 0.001, 0


class NoBatches:
    async def submit(self, entry: Any) -> Any:
        raise AssertionError("a record that failed its decode reached the inference stage")


@pytest.fixture
async def engine() -> AsyncIterator[Engine]:
    settings = Settings(weights="random:0", device="cpu", max_record_attempts=ATTEMPTS)
    engine = Engine(settings, Metrics())
    batcher = Batcher(engine._run_batch, max_batch_size=4, max_batch_delay_ms=5.0)
    engine._batcher = batcher
    await batcher.start()
    try:
        yield engine
    finally:
        await batcher.stop()
        for pool in engine.pools:  # the scripted pools a test installed
            await pool.stop()


async def classify(engine: Engine, slots: list[int]) -> list[Any]:
    return await asyncio.wait_for(
        asyncio.gather(*(engine._classify_slot(s, 10) for s in slots), return_exceptions=True),
        DEADLINE_S,
    )


def assert_a_writable_dead_letter(error: BaseException, reason: str, stage: str) -> None:
    assert isinstance(error, RetriesExhausted), repr(error)
    assert (error.reason, error.stage, error.attempts) == (reason, stage, ATTEMPTS)
    assert error.reason in DEAD_LETTER_REASONS and error.stage in STAGES
    record = ConsumerRecord("in", 0, 1, 1000, 0, b"k", b"v", None, 0, 0, ())
    assert dict(dead_letter_headers(record, error))  # the headers can be written


@pytest.mark.parametrize(
    "corrupt",
    [
        codec_workers.short_scores,  # once a ValueError out of the engine
        codec_workers.cpu_decode_past_the_batch,  # once an IndexError out of the engine
        codec_workers.cpu_decode_of_decoded_pixels,  # once a decoded record decoded again
        codec_workers.device_of_its_own,  # once a new metric series per batch
        codec_workers.nan_score,  # once a NaN in the prediction
    ],
)
async def test_a_batch_result_that_does_not_fit_its_batch_kills_the_worker_not_the_service(
    engine: Engine, corrupt: codec_workers.Corrupt
) -> None:
    engine.decode = Decoders()  # type: ignore[assignment]
    engine.inference = pool = await scripted_pool(
        "inference", codec_workers.scripted_inference, corrupt
    )
    first = pool.workers[0]

    innocent, poison = await classify(engine, [1, POISON])

    assert not isinstance(innocent, BaseException), repr(innocent)
    assert innocent.indices == list(range(codec_workers.TOP_K))
    devices = {
        sample.labels["device"]
        for metric in engine.metrics.registry.collect()
        for sample in metric.samples
        if "device" in sample.labels
    }
    assert devices <= set(engine.devices)  # no label value of the worker's choosing
    assert_a_writable_dead_letter(poison, "worker-crashed", "inference")
    assert first.exitcode is not None and pool.workers[0] is not first


@pytest.mark.parametrize(
    "corrupt",
    [
        codec_workers.error_class_not_a_string,  # once a TypeError and records left waiting
        codec_workers.reason_not_a_string,  # once a dead letter that could not be written
        codec_workers.error_not_a_wire_error,  # once a record left waiting
    ],
)
async def test_a_decode_reply_that_does_not_fit_its_chunk_kills_the_worker_not_the_service(
    engine: Engine, corrupt: codec_workers.Corrupt
) -> None:
    engine.decoders = pool = await scripted_pool("decode", codec_workers.scripted_decode, corrupt)
    engine.decode = chunks = DecodeChunks(pool)
    first = pool.workers[0]

    # One chunk whose poison answer is bad: every record is answered. The chunk is sent
    # again one record at a time; one queued behind the poison on the single worker
    # fails with it (retriable, like any record a worker held when it died).
    first_answer, poison_answer, last_answer = await asyncio.wait_for(
        asyncio.gather(
            *(chunks.submit((slot, 10, False)) for slot in (1, POISON, 2)), return_exceptions=True
        ),
        DEADLINE_S,
    )
    assert first_answer == (0.001, 0)
    assert isinstance(poison_answer, WorkerCrashed)
    assert last_answer == (0.001, 0) or isinstance(last_answer, WorkerCrashed)
    assert first.exitcode is not None and pool.workers[0] is not first

    engine._batcher = NoBatches()  # type: ignore[assignment]
    (poison,) = await classify(engine, [POISON])
    assert_a_writable_dead_letter(poison, "worker-crashed", "decode")


async def test_an_error_with_a_reason_of_the_workers_own_becomes_a_retriable_worker_error(
    engine: Engine,
) -> None:
    """Well-formed, so the worker lives; but its reason would be a new metric label and
    dead-letter reason each time: the record is retried, then dead-lettered as
    ``decode-failed``."""
    engine.decoders = pool = await scripted_pool(
        "decode", codec_workers.scripted_decode, codec_workers.reason_of_its_own
    )
    engine.decode = DecodeChunks(pool)
    engine._batcher = NoBatches()  # type: ignore[assignment]
    first = pool.workers[0]

    (poison,) = await classify(engine, [POISON])

    assert_a_writable_dead_letter(poison, "decode-failed", "decode")
    assert isinstance(poison, RecordError) and poison.__cause__ is not None
    assert "reason-" not in str(getattr(poison.__cause__, "reason", ""))
    assert pool.workers[0] is first and first.exitcode is None
