"""The CPU fallback of a JPEG the device could not decode runs in a decode worker,
through the engine with stand-in pools and the real batcher."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from streamer.config import Settings
from streamer.errors import WorkerCrashed
from streamer.metrics import Metrics
from streamer.pipeline.batcher import Batcher
from streamer.pipeline.engine import Engine
from streamer.vision.classifier import BatchEntry, BatchResult
from streamer.workers import codec

pytestmark = pytest.mark.timeout(10)

LENGTH = 10
UNDECODABLE = 1  # the slot whose JPEG the device decoder rejects


class Decoders:
    """Stands in for the decode pool: defers every JPEG to the device when asked to,
    decodes on the CPU otherwise; ``crash_first_cpu_decode`` kills the first CPU decode."""

    def __init__(self, crash_first_cpu_decode: bool = False) -> None:
        self.requests: list[tuple[int, int, bool]] = []
        self.crash = crash_first_cpu_decode

    async def submit(self, request: tuple[int, int, bool]) -> Any:
        self.requests.append(request)
        if request[2]:
            return 0.001, 1  # probed only, orientation 1
        if self.crash:
            self.crash = False
            raise WorkerCrashed("decode", -9)
        return 0.002, 0  # pixels written


class DevicePool:
    """Stands in for the inference pool: the device cannot decode UNDECODABLE's JPEG."""

    def __init__(self) -> None:
        self.batches: list[list[BatchEntry]] = []

    async def submit(self, request: codec.Request, timeout_s: float | None = None) -> Any:
        entries: list[BatchEntry] = request.body
        self.batches.append(list(entries))
        cpu = tuple(i for i, e in enumerate(entries) if e.encoded_bytes and e.slot == UNDECODABLE)
        return BatchResult(
            [[e.slot] for e in entries], [[1.0] for _ in entries], 0.01, cpu_decode=cpu
        )


@pytest.fixture
async def engine() -> AsyncIterator[Engine]:
    settings = Settings(weights="random:0", device="cpu", jpeg_decode="device")
    engine = Engine(settings, Metrics())
    assert engine.device_jpeg
    engine.inference = DevicePool()  # type: ignore[assignment]
    batcher = Batcher(engine._run_batch, max_batch_size=4, max_batch_delay_ms=1.0)
    engine._batcher = batcher
    await batcher.start()
    yield engine
    await batcher.stop()


def retries(engine: Engine, stage: str) -> float:
    return engine.metrics.record_retries.labels(stage)._value.get()  # type: ignore[no-any-return]


async def test_a_jpeg_the_device_rejects_is_decoded_by_a_decode_worker_and_batched_again(
    engine: Engine,
) -> None:
    decoders = Decoders()
    engine.decode = decoders  # type: ignore[assignment]
    engine.settings = engine.settings.model_copy(update={"max_record_attempts": 1})

    result = await engine._classify_slot(UNDECODABLE, LENGTH)

    assert result.indices == [UNDECODABLE]
    assert result.decode_s == pytest.approx(0.003)  # the probe and the CPU decode
    assert decoders.requests == [(UNDECODABLE, LENGTH, True), (UNDECODABLE, LENGTH, False)]
    pool = engine.inference
    assert isinstance(pool, DevicePool)
    assert pool.batches == [[BatchEntry(UNDECODABLE, LENGTH, 1)], [BatchEntry(UNDECODABLE)]]
    # With one attempt allowed it still succeeds: the fallback is not a failed attempt.
    assert retries(engine, "decode") == retries(engine, "inference") == 0


async def test_a_crash_during_the_cpu_fallback_retries_the_cpu_decode_at_the_decode_stage(
    engine: Engine,
) -> None:
    decoders = Decoders(crash_first_cpu_decode=True)
    engine.decode = decoders  # type: ignore[assignment]

    result = await engine._classify_slot(UNDECODABLE, LENGTH)

    assert result.indices == [UNDECODABLE]
    assert [defer for _, _, defer in decoders.requests] == [True, False, False]
    assert retries(engine, "decode") == 1
