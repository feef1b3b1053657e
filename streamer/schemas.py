"""The wire contract: input headers we read, the prediction JSON, dead-letter headers.

Input
    value   encoded image bytes (JPEG, PNG or WebP by default)
    key     any bytes; copied to the output and dead-letter records
    headers optional ``content-type``, ``ce_id`` (CloudEvents binary mode), ``traceparent``

Output (value is UTF-8 JSON, see ``Prediction``; key is the input key; headers
``content-type: application/json`` plus ``ce_id`` and ``traceparent`` when given)

Dead letter (value, key and headers are the input's, plus the ``DLQ_*`` headers)
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

HEADER_CONTENT_TYPE = "content-type"
HEADER_ID = "ce_id"
HEADER_TRACEPARENT = "traceparent"
PASSTHROUGH_HEADERS = (HEADER_ID, HEADER_TRACEPARENT)

DLQ_STAGE = "streamer-error-stage"
DLQ_REASON = "streamer-error-reason"
DLQ_CLASS = "streamer-error-class"
DLQ_MESSAGE = "streamer-error-message"
DLQ_SOURCE_TOPIC = "streamer-source-topic"
DLQ_SOURCE_PARTITION = "streamer-source-partition"
DLQ_SOURCE_OFFSET = "streamer-source-offset"
DLQ_SOURCE_TIMESTAMP = "streamer-source-timestamp"
# Only when the dead-letter topic could not hold the payload: the value is empty.
DLQ_VALUE_DROPPED_BYTES = "streamer-value-dropped-bytes"
# Only when even that was too large: the input's own headers, then its key, were dropped.
DLQ_HEADERS_DROPPED = "streamer-headers-dropped"
DLQ_KEY_DROPPED_BYTES = "streamer-key-dropped-bytes"
DLQ_HEADERS = (
    DLQ_STAGE,
    DLQ_REASON,
    DLQ_CLASS,
    DLQ_MESSAGE,
    DLQ_SOURCE_TOPIC,
    DLQ_SOURCE_PARTITION,
    DLQ_SOURCE_OFFSET,
    DLQ_SOURCE_TIMESTAMP,
)
MAX_ERROR_MESSAGE_CHARS = 1000

Headers = list[tuple[str, bytes]]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Source(_Frozen):
    topic: str
    partition: int
    offset: int
    timestamp: int  # ms since the epoch, as Kafka reports it


class ModelInfo(_Frozen):
    name: str
    weights: str
    device: str
    precision: str


class Label(_Frozen):
    index: int
    label: str
    score: float


class Timings(_Frozen):
    """Milliseconds spent in each stage by this record."""

    kafka_ms: float  # record timestamp -> fetched
    permit_wait_ms: float
    decode_ms: float
    batch_wait_ms: float
    inference_ms: float  # the whole batch's forward pass
    total_ms: float  # record timestamp -> prediction ready to send


class Prediction(_Frozen):
    id: str
    source: Source
    model: ModelInfo
    top_k: list[Label]
    batch_size: int
    timings: Timings


def header(headers: Headers | None, name: str) -> bytes | None:
    for key, value in headers or ():
        if key == name:
            return value
    return None


def record_id(headers: Headers | None, topic: str, partition: int, offset: int) -> str:
    """The input's ``ce_id`` header when present, else ``topic/partition/offset``."""
    value = header(headers, HEADER_ID)
    if value:
        return value.decode("utf-8", errors="replace")
    return f"{topic}/{partition}/{offset}"
