"""The inference engine: encoded bytes in, top-k out. No Kafka.

It owns the shared-memory slots, the decode and inference worker pools and the
batcher, and ``classify`` runs one payload through them:

1. take a slot and copy the payload into it (the caller holds a permit per slot);
2. a decode worker writes 3x224x224 uint8 pixels into the same slot;
3. the slot joins a batch; the inference worker reads the batch's pixels from
   shared memory and returns top-k per slot;
4. the slot is released.

Retriable failures (a worker died holding this payload) are retried up to
``max_record_attempts`` times from the stage that failed; decoded pixels stay in
the slot, so an inference retry does not decode again. When the attempts run out,
``RetriesExhausted`` names the stage of the last failure (``decode`` or
``inference``); any ``RecordError`` carries the number of attempts made. The
service wraps the engine with Kafka; the benchmark drives it directly.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

from streamer.config import Settings
from streamer.errors import (
    DecodeError,
    PayloadTooLarge,
    RecordError,
    RetriesExhausted,
    StreamerError,
    WorkerCrashed,
)
from streamer.metrics import Metrics
from streamer.pipeline.batcher import Batcher, BatchInfo
from streamer.schemas import ModelInfo
from streamer.vision.classifier import BatchEntry, BatchResult, InferenceConfig
from streamer.vision.decode import DecodeLimits
from streamer.vision.devices import (
    check_precision,
    cuda_device_count,
    jpeg_on_device,
    resolve_devices,
)
from streamer.vision.models import MODEL_NAME, WeightsSpec
from streamer.workers import decode_worker, inference_worker
from streamer.workers.pool import WorkerPool
from streamer.workers.shm import SlotPool, sweep_orphans

log = logging.getLogger(__name__)

BATCHES_IN_FLIGHT_PER_DEVICE = 2  # one running, one queued: the device never idles


@dataclass(frozen=True)
class Classified:
    """One payload's result and where its time went."""

    indices: list[int]
    scores: list[float]
    batch_size: int
    decode_s: float
    batch_wait_s: float  # decoded -> its batch dispatched to the inference worker
    forward_s: float  # the whole batch's forward pass


@dataclass(frozen=True)
class _BatchItem:
    indices: list[int]
    scores: list[float]
    batch_size: int
    forward_s: float
    dispatched_at: float


_Result = _BatchItem | WorkerCrashed | DecodeError  # one entry's outcome of a batch


class Engine:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.weights = WeightsSpec.parse(settings.weights)
        self.devices = resolve_devices(settings.device, cuda_device_count())
        self.device_jpeg = jpeg_on_device(settings.jpeg_decode, self.devices)
        for device in self.devices:
            check_precision(settings.precision, device)
        self.slots = SlotPool(settings.max_in_flight, settings.max_payload_bytes)
        self.model_info: ModelInfo | None = None
        self.decoders: WorkerPool | None = None
        self.inference: WorkerPool | None = None
        self._batcher: Batcher[BatchEntry, _Result] | None = None

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        s = self.settings
        sweep_orphans()
        self.slots.open()
        self.metrics.shm_bytes.set(self.slots.layout.total_bytes)
        layout = self.slots.layout
        limits = DecodeLimits(s.max_payload_bytes, s.max_image_pixels, s.allowed_formats)
        threads = s.inference_threads or max(1, os.cpu_count() or 1)
        self.decoders = WorkerPool(
            "decode",
            s.decode_workers,
            decode_worker.main,
            lambda i: (layout, limits),
            self.metrics,
            s.worker_start_timeout_s,
            hang_timeout_s=s.worker_timeout_s,
        )
        self.inference = WorkerPool(
            "inference",
            len(self.devices),
            inference_worker.main,
            lambda i: (
                layout,
                InferenceConfig(
                    self.weights, self.devices[i], s.precision, s.top_k, threads, limits=limits
                ),
            ),
            self.metrics,
            s.worker_start_timeout_s,
            hang_timeout_s=s.worker_timeout_s,
            standby=s.inference_standby,
        )
        await asyncio.gather(self.decoders.start(), self.inference.start())
        info = self.inference.workers[0].ready_info
        self.model_info = ModelInfo(
            name=MODEL_NAME,
            weights=info["weights"],
            device=",".join(self.devices),
            precision=s.precision,
        )
        self.metrics.model.info(self.model_info.model_dump())
        self._batcher = Batcher(
            self._run_batch,
            max_batch_size=s.max_batch_size,
            max_batch_delay_ms=s.max_batch_delay_ms,
            max_concurrent_batches=BATCHES_IN_FLIGHT_PER_DEVICE * len(self.devices),
            on_dispatch=self._on_batch,
        )
        await self._batcher.start()

    async def stop(self) -> None:
        """Stop the batcher and workers, unlink shared memory; safe to call twice."""
        if self._batcher is not None:
            await self._batcher.stop()
        for pool in (self.inference, self.decoders):
            if pool is not None:
                await pool.stop()
        self.slots.close()

    async def __aenter__(self) -> Engine:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def pools(self) -> list[WorkerPool]:
        return [p for p in (self.decoders, self.inference) if p is not None]

    async def classify(self, payload: bytes) -> Classified:
        """Classify one encoded image; raises a ``RecordError`` for bad input."""
        limit = self.settings.max_payload_bytes
        if len(payload) > limit:
            raise PayloadTooLarge(f"payload of {len(payload)} bytes exceeds {limit}")
        slot = self.slots.acquire()
        try:
            length = self.slots.write_payload(slot, payload)
            return await self._classify_slot(slot, length)
        finally:
            self.slots.release(slot)

    async def _classify_slot(self, slot: int, length: int) -> Classified:
        assert self.decoders is not None and self._batcher is not None
        decode_s: float | None = None
        decoded_at = 0.0
        attempts = self.settings.max_record_attempts
        for attempt in range(1, attempts + 1):
            try:
                if decode_s is None:
                    decode_s, orientation = await self.decoders.submit(
                        (slot, length, self.device_jpeg)
                    )
                    decoded_at = time.perf_counter()
                    # orientation > 0: a JPEG left encoded for the inference device
                    entry = BatchEntry(slot, length if orientation else 0, orientation or 1)
                item = await self._batcher.submit(entry)
                if isinstance(item, WorkerCrashed | DecodeError):
                    raise item  # the device could not decode it, or it killed the worker alone
                return Classified(
                    item.indices,
                    item.scores,
                    item.batch_size,
                    decode_s,
                    max(0.0, item.dispatched_at - decoded_at),
                    item.forward_s,
                )
            except StreamerError as exc:
                if not exc.retriable:
                    if isinstance(exc, RecordError):
                        exc.attempts = attempt
                    raise
                # No decode time yet: the decode worker failed, not the inference one.
                stage = "decode" if decode_s is None else "inference"
                if attempt == attempts:
                    raise RetriesExhausted(exc, stage=stage, attempts=attempt) from exc
                self.metrics.record_retries.labels(stage).inc()
                log.warning("retrying stage=%s attempt=%d error=%s", stage, attempt, exc)
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def _run_batch(self, entries: Sequence[BatchEntry]) -> list[_Result]:
        return await self._infer(list(entries))

    async def _infer(self, slots: list[BatchEntry]) -> list[_Result]:
        """Run one batch; if the worker dies, isolate the culprit by retrying in halves.

        Every record of a batch that crashed the worker is suspect. Re-running the
        two halves separately (recursively) gives the innocent records their results
        and leaves a crashing record alone in a batch of one, whose ``WorkerCrashed``
        becomes that record's result: ``classify`` counts it as one failed attempt.
        """
        assert self.inference is not None
        dispatched_at = time.perf_counter()
        try:
            result: BatchResult = await self.inference.submit(slots)
        except WorkerCrashed as exc:
            if len(slots) == 1:
                return [exc]
            half = len(slots) // 2
            log.warning(
                "inference worker died during a batch of %d; retrying in halves", len(slots)
            )
            return await self._infer(slots[:half]) + await self._infer(slots[half:])
        self._record_device(result)
        n = len(slots)
        items: list[_Result] = [
            _BatchItem(i, s, n, result.forward_s, dispatched_at)
            for i, s in zip(result.indices, result.scores, strict=True)
        ]
        for position, error in result.errors:
            items[position] = error
        return items

    def _record_device(self, result: BatchResult) -> None:
        if result.device_memory_bytes is not None:
            self.metrics.gpu_memory.labels(result.device).set(result.device_memory_bytes)
        if result.device_utilization is not None:
            self.metrics.gpu_utilization.labels(result.device).set(result.device_utilization)

    def _on_batch(self, info: BatchInfo) -> None:
        self.metrics.batch_size.observe(info.size)
        self.metrics.batch_fill_wait.observe(info.fill_s)
