"""The inference engine: encoded bytes in, top-k out. No Kafka.

It owns the shared-memory slots, the decode and inference worker pools and the
batcher, and ``classify`` runs one payload through them:

1. take a slot and copy the payload into it (the caller holds a permit per slot);
2. a decode worker writes 3x224x224 uint8 pixels into the same slot (or, with
   JPEGs decoded on the device, only checks a JPEG and leaves it encoded); the
   decodes asked for in one loop turn go to the workers together (``decode_chunks``);
3. the slot joins a batch; the inference worker decodes the batch's encoded JPEGs
   on the device, reads the other pixels from shared memory and returns top-k
   per slot, within a deadline learned from earlier batches (``deadlines``);
4. a JPEG the device could not decode comes back marked ``cpu_decode``: a decode
   worker decodes it on the CPU (``(slot, length, False)``) and the slot joins a
   later batch from step 3. This is not a failed attempt, and happens at most once;
5. the slot is released.

Retriable failures (a worker died or raised unexpectedly) are retried up to
``max_record_attempts`` times from the stage that failed; decoded pixels stay in
the slot, so an inference retry does not decode again. ``RetriesExhausted`` names
the stage of the last failure; a worker error that is not retriable is one at
once. A batch the worker crashed or hung on is re-run in halves until the culprit
is alone; a record that hangs the worker alone runs alone after that, and a second
hang alone is ``WorkerHung``. So whatever a worker does, ``classify`` raises only
``RecordError`` (with the attempts made). The benchmark drives the engine directly.

A batch is sent with the shape its reply must have (``BatchReply``: a row per entry,
``top_k`` classes known to the model, finite timings, a device of this engine,
``cpu_decode`` only for entries sent encoded), and the worker's process checks the
reply before the engine reads it: one that does not fit kills the worker, and the
batch fails as in a crash (halved, retried, then ``worker-crashed``).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

from streamer.config import Settings
from streamer.errors import (
    InferenceFailed,
    PayloadTooLarge,
    RecordError,
    RetriesExhausted,
    StreamerError,
    WorkerCrashed,
    WorkerHung,
)
from streamer.metrics import Metrics
from streamer.pipeline.batch_policy import (
    BatchTimes,
    FixedPolicy,
    LatencyTargetPolicy,
    best_batch_size,
    timed_sizes,
)
from streamer.pipeline.batcher import Batcher, BatchInfo
from streamer.pipeline.deadlines import BatchDeadlines
from streamer.pipeline.decode_chunks import DecodeChunks
from streamer.schemas import ModelInfo
from streamer.vision.classifier import BatchEntry, BatchReply, BatchResult, InferenceConfig
from streamer.vision.decode import DecodeLimits
from streamer.vision.devices import (
    check_jpeg_library,
    check_precision,
    cuda_device_count,
    jpeg_on_device,
    oversubscribes,
    resolve_devices,
    threads_per_worker,
)
from streamer.vision.models import MODEL_NAME, WeightsSpec, imagenet_labels
from streamer.workers import codec, decode_worker, inference_worker, sandbox
from streamer.workers.pool import WorkerPool
from streamer.workers.shm import SlotPool, sweep_orphans

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Classified:
    """One payload's result and where its time went."""

    indices: list[int]
    scores: list[float]
    batch_size: int
    decode_s: float
    batch_wait_s: float  # decoded -> its batch dispatched to the inference worker
    forward_s: float  # the whole batch's forward pass
    handled_s: float  # the inference worker's whole time on the batch (decode on the device too)


@dataclass(frozen=True)
class _BatchItem:
    indices: list[int]
    scores: list[float]
    batch_size: int
    forward_s: float
    handled_s: float
    dispatched_at: float


class _Fallback(enum.Enum):
    CPU_DECODE = "cpu-decode"  # the device could not decode the JPEG: a decode worker will


_CPU_DECODE = _Fallback.CPU_DECODE
# One entry's outcome of a batch: its result, the CPU fallback, or the worker failure
# it caused alone in a batch of one (a ``WorkerCrashed`` or a retriable worker error).
_Result = _BatchItem | StreamerError | _Fallback


class Engine:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.weights = WeightsSpec.parse(settings.weights)
        self.devices = resolve_devices(
            settings.device, cuda_device_count(), settings.cpu_inference_workers
        )
        self.device_jpeg = jpeg_on_device(settings.jpeg_decode, self.devices)
        self.classes = len(imagenet_labels())  # a reply's class indices are below this
        if self.device_jpeg:
            check_jpeg_library(settings.device_jpeg_library)
        for device in self.devices:
            check_precision(settings.precision, device)
        sandbox.check_settings(settings)  # no secret file where the workers may read
        self.slots = SlotPool(settings.max_in_flight, settings.max_payload_bytes)
        self.model_info: ModelInfo | None = None
        self.decoders: WorkerPool | None = None
        self.decode: DecodeChunks | None = None  # the decoders, a chunk per loop turn
        self.inference: WorkerPool | None = None
        self._batcher: Batcher[BatchEntry, _Result] | None = None
        self.deadlines = BatchDeadlines(settings.worker_timeout_s)
        self.batch_times = BatchTimes()  # the worker's own seconds per batch, for the policy
        delay_s = settings.max_batch_delay_ms / 1000.0
        self.policy: FixedPolicy | LatencyTargetPolicy = (
            FixedPolicy(settings.max_batch_size, delay_s)
            if settings.latency_target_ms is None
            else LatencyTargetPolicy(
                settings.latency_target_ms / 1000.0,
                settings.max_batch_size,
                delay_s,
                self.batch_times.estimated_s,
                workers=len(self.devices),
            )
        )
        self._decoding = 0  # records in the decode stage: the batcher's backlog

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
        threads = threads_per_worker(s.inference_threads, self.devices, os.cpu_count())
        if oversubscribes(self.devices, threads, os.cpu_count()):
            log.warning(
                "the CPU inference workers' threads outnumber the cores workers=%d"
                " inference_threads=%d cores=%s: forward passes will wait on each other",
                self.devices.count("cpu"),
                threads,
                os.cpu_count(),
            )
        self.decoders = WorkerPool(
            "decode",
            s.decode_workers,
            decode_worker.main,
            lambda i: (layout, limits, s.null_decode),
            self.metrics,
            s.worker_start_timeout_s,
            hang_timeout_s=s.worker_timeout_s,
            sandbox=s.worker_sandbox,
        )
        self.decode = DecodeChunks(self.decoders)
        self.inference = WorkerPool(
            "inference",
            len(self.devices),
            inference_worker.main,
            lambda i: (
                layout,
                InferenceConfig(
                    self.weights,
                    self.devices[i],
                    s.precision,
                    s.top_k,
                    threads,
                    timed_batch_sizes=(
                        timed_sizes(s.max_batch_size)
                        if s.batch_size_from_table or s.latency_target_ms is not None
                        else ()
                    ),
                    jpeg_library=s.device_jpeg_library,
                ),
            ),
            self.metrics,
            s.worker_start_timeout_s,
            hang_timeout_s=s.worker_timeout_s,
            standby=s.inference_standby,
            sandbox=s.worker_sandbox,
        )
        await asyncio.gather(self.decoders.start(), self.inference.start())
        info = self.inference.running[0].ready_info
        self.model_info = ModelInfo(
            name=MODEL_NAME,
            weights=info["weights"],
            device=",".join(dict.fromkeys(self.devices)),
            precision=s.precision,
        )
        self.metrics.model.info(self.model_info.model_dump())
        self.use_batch_table(info.get("batch_seconds") or {})
        self._batcher = self._new_batcher()
        await self._batcher.start()

    def _new_batcher(self) -> Batcher[BatchEntry, _Result]:
        """The batcher: ``batches_in_flight_per_device`` batches sent to each device
        before the first of them returns (by default 2: one running, one queued, so the
        device never waits for the event loop to send the next)."""
        s = self.settings
        return Batcher(
            self._run_batch,
            max_batch_size=s.max_batch_size,
            max_batch_delay_ms=s.max_batch_delay_ms,
            max_concurrent_batches=s.batches_in_flight_per_device * len(self.devices),
            on_dispatch=self._on_batch,
            policy=self.policy,
            backlog=lambda: self._decoding,
        )

    def use_batch_table(self, batch_seconds: dict[int, float]) -> None:
        """Start from the batch-time table the inference worker measured as it loaded.

        Without a latency target, batches are at most the size with the best images/s
        (``batch_size_from_table``). With one, the table gives the policy the shape of
        t(b) for sizes it has not run yet, scaled by the times it measures
        (``BatchTimes.estimated_s``). Its idle-machine times alone were too
        optimistic: a policy that believed them chose batches too small to keep up
        (p99 1.8 s at 90% of peak in docs/BENCHMARKS.md).
        """
        if not batch_seconds:
            return
        self.batch_times.use_table(batch_seconds)
        if not isinstance(self.policy, FixedPolicy):
            return
        best = best_batch_size(batch_seconds)
        log.info(
            "batch-time table %s; best size %d of at most %d (%s)",
            ", ".join(f"t({b})={t:.4f}s" for b, t in sorted(batch_seconds.items())),
            best,
            self.settings.max_batch_size,
            "used"
            if self.settings.batch_size_from_table
            else "not used: batch_size_from_table is off",
        )
        if self.settings.batch_size_from_table:
            self.policy.max_batch_size = best

    async def stop(self) -> None:
        """Stop the batcher and workers, unlink shared memory; safe to call twice."""
        if self._batcher is not None:
            await self._batcher.stop()
        if self.decode is not None:
            await self.decode.stop()
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
        """Invariants: at most ``max_record_attempts`` attempts fail; the CPU fallback
        is no attempt and happens at most once (the entry holds pixels after it); a
        record that hung the worker alone runs alone, and a second such hang is
        ``WorkerHung`` at once; whatever a worker raises leaves as a ``RecordError``."""
        assert self.decode is not None and self._batcher is not None
        defer_jpeg = self.device_jpeg
        entry: BatchEntry | None = None  # None: the decode stage is still to run
        decode_s = decoded_at = 0.0
        alone = False
        attempt, attempts = 1, self.settings.max_record_attempts
        while True:
            try:
                if entry is None:
                    self._decoding += 1
                    try:
                        seconds, orientation = await self.decode.submit((slot, length, defer_jpeg))
                    finally:
                        self._decoding -= 1
                    decode_s += seconds
                    decoded_at = time.perf_counter()
                    # orientation > 0: a JPEG left encoded for the inference device
                    entry = BatchEntry(slot, length if orientation else 0, orientation or 1)
                item = (
                    (await self._infer([entry]))[0] if alone else await self._batcher.submit(entry)
                )
                if item is _CPU_DECODE:
                    defer_jpeg, entry = False, None
                    continue
                if isinstance(item, WorkerCrashed):
                    if item.hung and alone:
                        raise WorkerHung(f"hung the inference worker alone twice: {item}")
                    alone = alone or item.hung
                    raise item  # it killed the worker alone in its batch
                if isinstance(item, StreamerError):
                    raise item  # the worker failed on it alone in its batch
                assert isinstance(item, _BatchItem)
                return Classified(
                    item.indices,
                    item.scores,
                    item.batch_size,
                    decode_s,
                    max(0.0, item.dispatched_at - decoded_at),
                    item.forward_s,
                    item.handled_s,
                )
            except StreamerError as exc:
                stage = "decode" if entry is None else "inference"  # no entry: decoding failed
                if isinstance(exc, RecordError) and not exc.retriable:
                    exc.attempts = attempt
                    raise
                # A worker's unexpected error is this record's dead letter, not the service's.
                if not exc.retriable or attempt == attempts:
                    raise RetriesExhausted(exc, stage=stage, attempts=attempt) from exc
                self.metrics.record_retries.labels(stage).inc()
                log.warning("retrying stage=%s attempt=%d error=%s", stage, attempt, exc)
                attempt += 1

    async def _run_batch(self, entries: Sequence[BatchEntry]) -> list[_Result]:
        return await self._infer(list(entries))

    async def _infer(self, entries: list[BatchEntry]) -> list[_Result]:
        """Run one batch; if the worker fails it, isolate the culprit by retrying in halves.

        Every record of a batch that crashed or hung the worker, or made it raise a
        retriable error, is suspect. Re-running the two halves separately
        (recursively) gives the innocent records their results and leaves the culprit
        alone in a batch of one, whose failure becomes its result: ``classify`` counts
        it as one failed attempt. A non-retriable error fails every record at once.
        With learned deadlines (``deadlines``) one hostile record costs at most
        ``ceil(log2(max_batch_size)) + 2`` of them: one per halving level, the batch
        of one, and its second run alone.
        """
        assert self.inference is not None
        # The worker's process checks the reply against it before it gets here.
        reply = BatchReply(entries, self.settings.top_k, self.classes, frozenset(self.devices))
        dispatched_at = time.perf_counter()
        try:
            with self.deadlines.request(len(entries)) as timeout_s:
                result: BatchResult = await self.inference.submit(
                    codec.Request(entries, reply), timeout_s=timeout_s
                )
        except RecordError as exc:  # a whole batch's failure is no one record's fault
            failure: StreamerError = InferenceFailed(
                f"a batch failed with {type(exc).__name__}: {exc}"
            )
        except StreamerError as exc:
            if not exc.retriable:
                raise  # the same for every record: each one's dead letter
            failure = exc
        else:
            return self._items(entries, result, dispatched_at)
        if len(entries) == 1:
            return [failure]
        # A crash, a hang or an error: any record of the batch may be the cause.
        what = "hung" if getattr(failure, "hung", False) else type(failure).__name__
        log.warning("inference batch of %d failed (%s); retrying in halves", len(entries), what)
        half = len(entries) // 2
        return await self._infer(entries[:half]) + await self._infer(entries[half:])

    def _items(
        self, entries: list[BatchEntry], result: BatchResult, dispatched_at: float
    ) -> list[_Result]:
        self._record_device(result)
        n = len(entries)
        handled_s = result.handled_s or result.forward_s
        self.batch_times.observe(n, handled_s)
        self.metrics.inference_busy.inc(handled_s)
        items: list[_Result] = [
            _BatchItem(i, s, n, result.forward_s, handled_s, dispatched_at)
            for i, s in zip(result.indices, result.scores, strict=True)
        ]
        for position in result.cpu_decode:
            items[position] = _CPU_DECODE
        return items

    def _record_device(self, result: BatchResult) -> None:
        if result.device_memory_bytes is not None:
            self.metrics.gpu_memory.labels(result.device).set(result.device_memory_bytes)
        if result.device_utilization is not None:
            self.metrics.gpu_utilization.labels(result.device).set(result.device_utilization)

    def _on_batch(self, info: BatchInfo) -> None:
        self.metrics.batch_size.observe(info.size)
        self.metrics.batch_fill_wait.observe(info.fill_s)
        self.metrics.batch_size_limit.set(info.limit)

    def observe_latency(self, seconds: float, fetched_after_s: float = 0.0) -> None:
        """A prediction's end-to-end latency and how long after it was written the
        record was fetched, for the latency-target policy (``LatencyTargetPolicy.observe``)."""
        if isinstance(self.policy, LatencyTargetPolicy):
            queued = self._batcher.queued if self._batcher is not None else 0
            self.policy.observe(
                seconds,
                lagging=self.policy.lagging(queued, self._decoding),
                fetched_after_s=fetched_after_s,
            )
            headroom = self.policy.headroom_s
            if headroom is not None:
                self.metrics.latency_headroom.set(headroom)
