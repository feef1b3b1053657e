"""What happens to one Kafka record, from fetched to acked.

``RecordProcessor.process`` has the engine classify the record's value and
publishes the prediction. Any ``RecordError`` (bad image, too large, retries
exhausted) becomes a dead letter instead. It returns only when the output or the
dead letter is acked, so the caller may then mark the offset done.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TypeAlias

from aiokafka import ConsumerRecord
from aiokafka.errors import MessageSizeTooLargeError

from streamer.errors import RecordError
from streamer.kafka.publisher import Publisher
from streamer.metrics import Metrics
from streamer.pipeline.engine import Engine
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
    Prediction,
    Source,
    Timings,
    record_id,
)

log = logging.getLogger(__name__)

Record: TypeAlias = ConsumerRecord[bytes, bytes]


@dataclass(frozen=True)
class ProcessorConfig:
    output_topic: str
    dlq_topic: str


class RecordProcessor:
    def __init__(
        self,
        config: ProcessorConfig,
        engine: Engine,
        publisher: Publisher,
        metrics: Metrics,
        labels: list[str],
    ) -> None:
        self._config = config
        self._engine = engine
        self._publisher = publisher
        self._metrics = metrics
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
        result = await self._engine.classify(record.value or b"")
        assert self._engine.model_info is not None
        now = time.perf_counter()
        kafka_s = max(0.0, time.time() - record.timestamp / 1000.0 - (now - fetched_at))
        m = self._metrics
        m.observe_stage("kafka", kafka_s)
        m.observe_stage("permit_wait", permit_wait_s)
        m.observe_stage("decode", result.decode_s)
        m.observe_stage("batch_wait", result.batch_wait_s)
        m.observe_stage("inference", result.forward_s)
        return Prediction(
            id=record_id(record.headers, record.topic, record.partition, record.offset),
            source=Source(
                topic=record.topic,
                partition=record.partition,
                offset=record.offset,
                timestamp=record.timestamp,
            ),
            model=self._engine.model_info,
            top_k=[
                Label(index=i, label=self._labels[i], score=s)
                for i, s in zip(result.indices, result.scores, strict=True)
            ],
            batch_size=result.batch_size,
            timings=Timings(
                kafka_ms=kafka_s * 1000,
                permit_wait_ms=permit_wait_s * 1000,
                decode_ms=result.decode_s * 1000,
                batch_wait_ms=result.batch_wait_s * 1000,
                inference_ms=result.forward_s * 1000,
                total_ms=(kafka_s + now - fetched_at) * 1000,
            ),
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
