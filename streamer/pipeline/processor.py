"""What one Kafka record turns into: a prediction or a dead letter.

``RecordProcessor.process`` takes the image out of the record (``envelope``: binary
or structured CloudEvent), has the engine classify it and returns the ``Outcome`` to
publish: the prediction, a CloudEvent in binary mode, or, for any ``RecordError``
(key or headers above their limits, a malformed structured event, bad image, too
large, retries exhausted), a dead letter carrying the original bytes and the error
(``streamer.kafka.records``). Batch size and timings go into the prediction only
with ``include_timings``; the metrics observe them either way.

Sending it is the delivery's job (``streamer.kafka.delivery``), which differs
between at-least-once and exactly-once; ``delivered`` counts it once it is durable.
"""

from __future__ import annotations

import asyncio
import logging
import time
import traceback
from dataclasses import dataclass

from streamer.config import Settings
from streamer.errors import InternalError, RecordError
from streamer.kafka.records import (
    DEFAULT_SOURCE,
    Outcome,
    OutputEvent,
    Record,
    dead_letter,
    in_own_namespace,
    metadata_error,
    prediction,
)
from streamer.metrics import Metrics
from streamer.pipeline.engine import Engine
from streamer.pipeline.envelope import Envelope, is_structured, open_envelope
from streamer.schemas import prediction_json

log = logging.getLogger(__name__)

# Structured events larger than this are parsed off the event loop.
_PARSE_IN_THREAD_BYTES = 256 * 1024
_MAX_TRACEBACK_CHARS = 4000


@dataclass(frozen=True)
class ProcessorConfig:
    output_topic: str
    dlq_topic: str
    group_id: str = ""
    event_source: str = DEFAULT_SOURCE  # the outputs' ce_source
    include_timings: bool = False
    max_payload_bytes: int = 8 * 1024 * 1024

    @classmethod
    def from_settings(cls, s: Settings) -> ProcessorConfig:
        return cls(
            s.output_topic,
            s.dlq_topic,
            s.group_id,
            s.event_source or f"streamer/{s.group_id}",
            s.include_timings,
            s.max_payload_bytes,
        )


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
        assert engine.model_info is not None, "the engine is started first"
        self._model = engine.model_info.model_dump()

    async def process(self, record: Record, fetched_at: float, permit_wait_s: float) -> Outcome:
        """Classify the record; return its prediction, or its dead letter.

        This is where a record enters: whatever its bytes make any step raise ends as
        its dead letter (``internal-error`` for what nobody expected), never as an
        exception for the service. Only cancellation (the service stopping) passes.
        """
        raw, record = record, in_own_namespace(record)
        stage = "intake"
        try:
            error = metadata_error(record)
            if error is not None:
                raise error
            envelope = await self._open(record)
            stage = "decode"
            value = await self._classify(record, envelope, fetched_at, permit_wait_s)
            stage = "publish"
            c = self._config
            event = OutputEvent.for_record(
                record, c.group_id, c.event_source, envelope.id, envelope.traceparent
            )
            return prediction(record, c.output_topic, value, c.dlq_topic, c.group_id, event)
        except RecordError as error:
            return self._dead_letter(record, error)
        except Exception as exc:
            return self.internal_error(raw, exc, stage)

    def internal_error(self, record: Record, exc: BaseException, stage: str) -> Outcome:
        """The dead letter of ``record`` (as fetched) for an error nobody expected while
        handling it. The log line has the traceback, not the message (which may quote the
        record): the dead letter has that, bounded."""
        error = InternalError.of(exc, stage)
        log.error(
            "unexpected error handling a record topic=%s partition=%d offset=%d stage=%s"
            " class=%s\n%s",
            record.topic,
            record.partition,
            record.offset,
            stage,
            type(exc).__name__,
            "".join(traceback.format_tb(exc.__traceback__))[-_MAX_TRACEBACK_CHARS:],
        )
        return self._dead_letter(in_own_namespace(record), error)

    def delivered(
        self, record: Record, outcome: Outcome, produce_s: float, fetched_at: float
    ) -> None:
        """Count an outcome once it is durable (acked, or committed in a transaction);
        ``fetched_at``: ``time.perf_counter()`` when the record was fetched."""
        m = self._metrics
        m.observe_stage("produce", produce_s)
        if outcome.dead_letter_reason is None:
            end_to_end = time.time() - record.timestamp / 1000.0
            m.observe_stage("end_to_end", end_to_end)
            self._engine.observe_latency(end_to_end, _time_in_kafka(record, fetched_at))
            m.count_predicted(outcome.topic)
        else:
            m.records_dead_lettered.labels(outcome.topic, outcome.dead_letter_reason).inc()

    async def _open(self, record: Record) -> Envelope:
        limit = self._config.max_payload_bytes
        if is_structured(record) and len(record.value or b"") > _PARSE_IN_THREAD_BYTES:
            return await asyncio.to_thread(open_envelope, record, limit)
        return open_envelope(record, limit)

    async def _classify(
        self, record: Record, envelope: Envelope, fetched_at: float, permit_wait_s: float
    ) -> bytes:
        """The prediction's JSON (``schemas.Prediction``, built by ``prediction_json``)."""
        result = await self._engine.classify(envelope.image)
        now = time.perf_counter()
        kafka_s = _time_in_kafka(record, fetched_at)
        m = self._metrics
        m.observe_stage("kafka", kafka_s)
        m.observe_stage("permit_wait", permit_wait_s)
        m.observe_stage("decode", result.decode_s)
        m.observe_stage("batch_wait", result.batch_wait_s)
        m.observe_stage("inference", result.forward_s)
        timings = None
        if self._config.include_timings:
            timings = {
                "kafka_ms": kafka_s * 1000,
                "permit_wait_ms": permit_wait_s * 1000,
                "decode_ms": result.decode_s * 1000,
                "batch_wait_ms": result.batch_wait_s * 1000,
                "inference_ms": result.forward_s * 1000,
                "total_ms": (kafka_s + now - fetched_at) * 1000,
            }
        return prediction_json(
            envelope.id,
            (record.topic, record.partition, record.offset, record.timestamp),
            self._model,
            [(i, self._labels[i], s) for i, s in zip(result.indices, result.scores, strict=True)],
            result.batch_size if timings is not None else None,
            timings,
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
        return dead_letter(record, error, self._config.dlq_topic, self._config.group_id)


def _time_in_kafka(record: Record, fetched_at: float) -> float:
    """Seconds from the record's timestamp (CreateTime) to its fetch at ``fetched_at``
    (``time.perf_counter()``): the wall clock now, less the time since the fetch."""
    return max(0.0, time.time() - record.timestamp / 1000.0 - (time.perf_counter() - fetched_at))
