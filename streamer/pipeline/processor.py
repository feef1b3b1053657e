"""What one Kafka record turns into: a prediction or a dead letter.

``RecordProcessor.process`` has the engine classify the record's value and
returns the ``Outcome`` to publish: the prediction, or, for any ``RecordError``
(key or headers above their limits, bad image, too large, retries exhausted), a
dead letter carrying the original bytes and the error (``streamer.kafka.records``).
Sending it is the delivery's job (``streamer.kafka.delivery``),
which differs between at-least-once and exactly-once; ``delivered`` counts it
once it is durable.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from streamer.errors import RecordError
from streamer.kafka.records import (
    Outcome,
    Record,
    dead_letter,
    metadata_error,
    prediction,
    too_large_dead_letter,
)
from streamer.metrics import Metrics
from streamer.pipeline.engine import Engine
from streamer.schemas import Label, Prediction, Source, Timings, record_id

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProcessorConfig:
    output_topic: str
    dlq_topic: str


class RecordProcessor:
    def __init__(
        self,
        config: ProcessorConfig,
        engine: Engine,
        metrics: Metrics,
        labels: list[str],
    ) -> None:
        self._config = config
        self._engine = engine
        self._metrics = metrics
        self._labels = labels

    async def process(self, record: Record, fetched_at: float, permit_wait_s: float) -> Outcome:
        """Classify the record; return its prediction, or its dead letter."""
        try:
            error = metadata_error(record)
            if error is not None:
                raise error
            result = await self._classify(record, fetched_at, permit_wait_s)
        except RecordError as error:
            return self._dead_letter(record, error)
        value = result.model_dump_json().encode()
        too_large = too_large_dead_letter(record, self._config.dlq_topic)
        return prediction(record, self._config.output_topic, value, too_large)

    def delivered(self, record: Record, outcome: Outcome, produce_s: float) -> None:
        """Count an outcome once it is durable (acked, or committed in a transaction)."""
        m = self._metrics
        m.observe_stage("produce", produce_s)
        if outcome.dead_letter_reason is None:
            m.observe_stage("end_to_end", time.time() - record.timestamp / 1000.0)
            m.records_predicted.labels(outcome.topic).inc()
        else:
            m.records_dead_lettered.labels(outcome.topic, outcome.dead_letter_reason).inc()

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

    def _dead_letter(self, record: Record, error: RecordError) -> Outcome:
        log.info(
            "dead letter topic=%s partition=%d offset=%d stage=%s reason=%s error=%s",
            record.topic,
            record.partition,
            record.offset,
            error.stage,
            error.reason,
            error,
        )
        return dead_letter(record, error, self._config.dlq_topic)
