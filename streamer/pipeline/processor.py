"""What happens to one record, from fetched to acked.

``RecordProcessor.process`` copies the payload into a shared-memory slot, has a
decode worker turn it into pixels, waits for its batch on the inference worker,
and publishes the prediction. Any ``RecordError`` (bad image, too large, retries
exhausted) becomes a dead letter instead. It returns only when the output or the
dead letter is acked, so the caller may then mark the offset done.

Retriable failures (a worker died holding this record) are retried up to
``max_record_attempts`` times from the stage that failed; the decoded pixels stay
in the slot, so an inference retry does not decode again.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TypeAlias

from aiokafka import ConsumerRecord
from aiokafka.errors import MessageSizeTooLargeError

from streamer.errors import (
    PayloadTooLarge,
    RecordError,
    RetriesExhausted,
    StreamerError,
    WorkerCrashed,
)
from streamer.kafka.publisher import Publisher
from streamer.metrics import Metrics
from streamer.pipeline.batcher import Batcher
from streamer.schemas import (
    DLQ_CLASS,
    DLQ_MESSAGE,
    DLQ_REASON,
    DLQ_SOURCE_OFFSET,
    DLQ_SOURCE_PARTITION,
    DLQ_SOURCE_TIMESTAMP,
    DLQ_SOURCE_TOPIC,
    DLQ_STAGE,
    HEADER_CONTENT_TYPE,
    MAX_ERROR_MESSAGE_CHARS,
    PASSTHROUGH_HEADERS,
    Headers,
    Label,
    ModelInfo,
    Prediction,
    Source,
    Timings,
    record_id,
)
from streamer.workers.pool import WorkerPool
from streamer.workers.shm import SlotPool

log = logging.getLogger(__name__)

Record: TypeAlias = ConsumerRecord[bytes, bytes]


@dataclass(frozen=True)
class Classified:
    """One item of a batch result, as the batcher hands it back."""

    indices: list[int]
    scores: list[float]
    batch_size: int
    forward_s: float
    dispatched_at: float  # perf_counter when the batch went to the worker


@dataclass(frozen=True)
class ProcessorConfig:
    output_topic: str
    dlq_topic: str
    max_payload_bytes: int
    max_record_attempts: int


class RecordProcessor:
    def __init__(
        self,
        config: ProcessorConfig,
        slots: SlotPool,
        decoders: WorkerPool,
        batcher: Batcher[int, Classified],
        publisher: Publisher,
        metrics: Metrics,
        model: ModelInfo,
        labels: list[str],
    ) -> None:
        self._config = config
        self._slots = slots
        self._decoders = decoders
        self._batcher = batcher
        self._publisher = publisher
        self._metrics = metrics
        self._model = model
        self._labels = labels

    async def process(self, record: Record, fetched_at: float, permit_wait_s: float) -> str:
        """Publish the record's prediction or dead letter; return which (for counting)."""
        try:
            prediction = await self._classify(record, fetched_at, permit_wait_s)
        except RecordError as error:
            await self._dead_letter(record, error)
            return "dead-letter"
        await self._publish(record, prediction)
        return "prediction"

    async def _classify(
        self, record: Record, fetched_at: float, permit_wait_s: float
    ) -> Prediction:
        payload = record.value or b""
        if len(payload) > self._config.max_payload_bytes:
            raise PayloadTooLarge(
                f"payload of {len(payload)} bytes exceeds {self._config.max_payload_bytes}"
            )
        slot = self._slots.acquire()
        try:
            length = self._slots.write_payload(slot, payload)
            decode_s: float | None = None
            decoded_at = 0.0
            result: Classified | None = None
            for attempt in range(1, self._config.max_record_attempts + 1):
                try:
                    if decode_s is None:
                        decode_s = await self._decoders.submit((slot, length))
                        decoded_at = time.perf_counter()
                    result = await self._batcher.submit(slot)
                    break
                except StreamerError as exc:
                    if not exc.retriable:
                        raise
                    stage = "decode" if decode_s is None else "inference"
                    self._metrics.record_retries.labels(stage).inc()
                    log.warning(
                        "retrying topic=%s partition=%d offset=%d attempt=%d error=%s",
                        record.topic,
                        record.partition,
                        record.offset,
                        attempt,
                        exc,
                    )
                    if attempt == self._config.max_record_attempts:
                        raise RetriesExhausted(
                            f"gave up after {attempt} attempts: {exc}",
                            reason=_crash_reason(exc),
                        ) from exc
        finally:
            self._slots.release(slot)
        assert result is not None and decode_s is not None
        now = time.perf_counter()
        kafka_s = max(0.0, time.time() - record.timestamp / 1000.0 - (now - fetched_at))
        batch_wait_s = max(0.0, result.dispatched_at - decoded_at)
        timings = Timings(
            kafka_ms=kafka_s * 1000,
            permit_wait_ms=permit_wait_s * 1000,
            decode_ms=decode_s * 1000,
            batch_wait_ms=batch_wait_s * 1000,
            inference_ms=result.forward_s * 1000,
            total_ms=(kafka_s + now - fetched_at) * 1000,
        )
        m = self._metrics
        m.observe_stage("kafka", kafka_s)
        m.observe_stage("permit_wait", permit_wait_s)
        m.observe_stage("decode", decode_s)
        m.observe_stage("batch_wait", batch_wait_s)
        m.observe_stage("inference", result.forward_s)
        return Prediction(
            id=record_id(record.headers, record.topic, record.partition, record.offset),
            source=Source(
                topic=record.topic,
                partition=record.partition,
                offset=record.offset,
                timestamp=record.timestamp,
            ),
            model=self._model,
            top_k=[
                Label(index=i, label=self._labels[i], score=s)
                for i, s in zip(result.indices, result.scores, strict=False)
            ],
            batch_size=result.batch_size,
            timings=timings,
        )

    async def _publish(self, record: Record, prediction: Prediction) -> None:
        headers: Headers = [(HEADER_CONTENT_TYPE, b"application/json")]
        headers += [(k, v) for k, v in record.headers or () if k in PASSTHROUGH_HEADERS]
        sent = time.perf_counter()
        await self._publisher.send(
            self._config.output_topic, prediction.model_dump_json().encode(), record.key, headers
        )
        self._metrics.observe_stage("produce", time.perf_counter() - sent)
        self._metrics.observe_stage("end_to_end", time.time() - record.timestamp / 1000.0)
        self._metrics.records_predicted.labels(self._config.output_topic).inc()

    async def _dead_letter(self, record: Record, error: RecordError) -> None:
        log.info(
            "dead letter topic=%s partition=%d offset=%d stage=%s reason=%s error=%s",
            record.topic,
            record.partition,
            record.offset,
            error.stage,
            error.reason,
            error,
        )
        headers = list(record.headers or ()) + dead_letter_headers(record, error)
        sent = time.perf_counter()
        try:
            await self._publisher.send(self._config.dlq_topic, record.value, record.key, headers)
        except MessageSizeTooLargeError:
            # The dead-letter topic cannot hold the payload: keep everything but the value,
            # and say so, rather than drop the record or stall the partition.
            size = len(record.value or b"")
            headers.append(("streamer-value-dropped-bytes", str(size).encode()))
            await self._publisher.send(self._config.dlq_topic, None, record.key, headers)
        self._metrics.observe_stage("produce", time.perf_counter() - sent)
        self._metrics.records_dead_lettered.labels(self._config.dlq_topic, error.reason).inc()


def dead_letter_headers(record: Record, error: RecordError) -> Headers:
    message = str(error)[:MAX_ERROR_MESSAGE_CHARS]
    return [
        (DLQ_STAGE, error.stage.encode()),
        (DLQ_REASON, error.reason.encode()),
        (DLQ_CLASS, type(error).__name__.encode()),
        (DLQ_MESSAGE, message.encode("utf-8", errors="replace")),
        (DLQ_SOURCE_TOPIC, record.topic.encode()),
        (DLQ_SOURCE_PARTITION, str(record.partition).encode()),
        (DLQ_SOURCE_OFFSET, str(record.offset).encode()),
        (DLQ_SOURCE_TIMESTAMP, str(record.timestamp).encode()),
    ]


def _crash_reason(exc: StreamerError) -> str:
    return "worker-crashed" if isinstance(exc, WorkerCrashed) else "inference-failed"
