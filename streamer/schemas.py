"""The wire contract: input headers we read, the prediction JSON, dead-letter headers.

Input (``streamer.pipeline.envelope`` reads it)
    binary  value = encoded image bytes (JPEG, PNG or WebP by default); headers
            optional ``content-type``, ``ce_id`` (CloudEvents binary mode), ``traceparent``
    structured  ``content-type: application/cloudevents+json``; value = a JSON
            CloudEvent whose ``data_base64`` is the image and ``id`` its id
    key     any bytes; copied to the output and dead-letter records

Output: a CloudEvent in the Kafka binding's binary mode. Value = UTF-8 JSON
(``Prediction``); key = the input's key; headers ``ce_specversion``, ``ce_id`` (new
for every output, see ``streamer.kafka.records.event_id``), ``ce_source``, ``ce_type``,
``ce_subject`` (the input's id), ``ce_time``, ``content-type: application/json``, and
the input's ``traceparent`` when it had one.

Dead letter: the input's value, key and headers as they came, plus the headers of
``DEAD_LETTER_HEADERS``. It is no new event: ``ce_*`` headers, when present, are the
input's, so that ``streamer replay`` re-publishes the same event.

Header names that start with ``streamer-`` are the service's own. An input header
whose name would collide is renamed on the way in (``escape_input_header``: the prefix
``input-`` is put before it, and before an already escaped one, so the mapping can be
undone), so nothing the service or ``streamer replay`` reads back can come from a
producer; replay undoes the renaming (``unescape_input_header``).

``python -m streamer.contract`` publishes the prediction's JSON Schema and the
dead-letter header list under ``docs/contract/``; a unit test fails when they drift.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import SkipJsonSchema

from streamer.errors import DEAD_LETTER_REASONS, MAX_MESSAGE_CHARS, STAGES

HEADER_CONTENT_TYPE = "content-type"
HEADER_ID = "ce_id"
HEADER_TRACEPARENT = "traceparent"

# CloudEvents Kafka protocol binding, binary mode: one header per context attribute.
CE_SPECVERSION = "ce_specversion"
CE_ID = HEADER_ID
CE_SOURCE = "ce_source"
CE_TYPE = "ce_type"
CE_SUBJECT = "ce_subject"
CE_TIME = "ce_time"
SPECVERSION = "1.0"
JSON_CONTENT_TYPE = "application/json"
STRUCTURED_CONTENT_TYPE = "application/cloudevents+json"

# Bumped only by a breaking change of the prediction JSON (a field removed, renamed or
# given another meaning); optional fields may be added without it. The type follows.
SCHEMA_VERSION: Final = 1
PREDICTION_TYPE = f"io.streamer.prediction.v{SCHEMA_VERSION}"

DLQ_STAGE = "streamer-error-stage"
DLQ_REASON = "streamer-error-reason"
DLQ_CLASS = "streamer-error-class"
DLQ_MESSAGE = "streamer-error-message"
DLQ_SOURCE_TOPIC = "streamer-source-topic"
DLQ_SOURCE_PARTITION = "streamer-source-partition"
DLQ_SOURCE_OFFSET = "streamer-source-offset"
DLQ_SOURCE_TIMESTAMP = "streamer-source-timestamp"
DLQ_CONSUMER_GROUP = "streamer-consumer-group"
DLQ_ATTEMPTS = "streamer-attempts"
# Only when the dead-letter topic could not hold the payload: the value is empty.
DLQ_VALUE_DROPPED_BYTES = "streamer-value-dropped-bytes"
# Only when even that was too large: the input's own headers, then its key, were dropped.
DLQ_HEADERS_DROPPED = "streamer-headers-dropped"
DLQ_KEY_DROPPED_BYTES = "streamer-key-dropped-bytes"
# On every dead letter (``streamer replay`` removes them before re-publishing).
DLQ_HEADERS = (
    DLQ_STAGE,
    DLQ_REASON,
    DLQ_CLASS,
    DLQ_MESSAGE,
    DLQ_SOURCE_TOPIC,
    DLQ_SOURCE_PARTITION,
    DLQ_SOURCE_OFFSET,
    DLQ_SOURCE_TIMESTAMP,
    DLQ_CONSUMER_GROUP,
    DLQ_ATTEMPTS,
)
MAX_ERROR_MESSAGE_CHARS = MAX_MESSAGE_CHARS

Headers = list[tuple[str, bytes]]


@dataclass(frozen=True)
class HeaderSpec:
    """One published dead-letter header: its value (UTF-8) as a JSON Schema fragment."""

    name: str
    required: bool
    value: dict[str, Any]
    meaning: str


_TEXT = {"type": "string", "minLength": 1}
_UUID5 = "^[0-9a-f]{8}-[0-9a-f]{4}-5[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$"
PREDICTION_HEADERS = (
    HeaderSpec(CE_SPECVERSION, True, {"const": SPECVERSION}, "CloudEvents version"),
    HeaderSpec(
        CE_ID,
        True,
        {"type": "string", "pattern": _UUID5},
        "new for this output: UUIDv5 of `<group_id>/<topic>/<partition>/<offset>/prediction`, "
        "so the same when a crash makes the service write the output again",
    ),
    HeaderSpec(CE_SOURCE, True, _TEXT, "`event_source`, default `streamer/<group_id>`"),
    HeaderSpec(CE_TYPE, True, {"const": PREDICTION_TYPE}, "what happened: an image classified"),
    HeaderSpec(CE_SUBJECT, True, _TEXT, "the input's id, as the prediction's `id` field"),
    HeaderSpec(
        CE_TIME,
        True,
        {"type": "string", "pattern": r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$"},
        "when the prediction was made (RFC 3339, UTC, milliseconds)",
    ),
    HeaderSpec(HEADER_CONTENT_TYPE, True, {"const": JSON_CONTENT_TYPE}, "the value is UTF-8 JSON"),
    HeaderSpec(HEADER_TRACEPARENT, False, _TEXT, "the input's W3C trace context, when it had one"),
)

_COUNT = {"type": "string", "pattern": "^[0-9]+$"}
DEAD_LETTER_HEADERS = (
    HeaderSpec(DLQ_STAGE, True, {"enum": list(STAGES)}, "the pipeline stage that failed"),
    HeaderSpec(DLQ_REASON, True, {"enum": list(DEAD_LETTER_REASONS)}, "why, as a fixed code"),
    HeaderSpec(
        DLQ_CLASS,
        True,
        {"type": "string", "pattern": "^[A-Za-z_][A-Za-z0-9_]*$"},
        "the error class, e.g. `DecodeError`",
    ),
    HeaderSpec(
        DLQ_MESSAGE,
        True,
        {"type": "string", "maxLength": MAX_ERROR_MESSAGE_CHARS},
        f"the error message (at most {MAX_ERROR_MESSAGE_CHARS} characters)",
    ),
    HeaderSpec(
        DLQ_SOURCE_TOPIC, True, {"type": "string", "minLength": 1}, "the input record's topic"
    ),
    HeaderSpec(DLQ_SOURCE_PARTITION, True, _COUNT, "the input record's partition"),
    HeaderSpec(DLQ_SOURCE_OFFSET, True, _COUNT, "the input record's offset"),
    HeaderSpec(
        DLQ_SOURCE_TIMESTAMP,
        True,
        {"type": "string", "pattern": "^-?[0-9]+$"},
        "the input record's timestamp, ms since the epoch (-1: none)",
    ),
    HeaderSpec(
        DLQ_CONSUMER_GROUP,
        True,
        {"type": "string", "minLength": 1},
        "the consumer group (`group_id`) of the instance that dead-lettered it",
    ),
    HeaderSpec(
        DLQ_ATTEMPTS,
        True,
        {"type": "string", "pattern": "^[1-9][0-9]*$"},
        "attempts this instance made (more than 1 after retries of a crashed worker)",
    ),
    HeaderSpec(
        DLQ_VALUE_DROPPED_BYTES,
        False,
        _COUNT,
        "only when the topic could not hold the payload: its size; the value is empty",
    ),
    HeaderSpec(
        DLQ_HEADERS_DROPPED,
        False,
        _COUNT,
        "only when even that was too large: how many input headers were dropped",
    ),
    HeaderSpec(
        DLQ_KEY_DROPPED_BYTES,
        False,
        _COUNT,
        "only when even that was too large: the size of the dropped key",
    ),
)


def _no_default(schema: dict[str, Any]) -> None:
    """An optional field is absent, never null: publish no default for it."""
    schema.pop("default", None)


class _Frozen(BaseModel):
    # Closed for the code that builds it, open in the published schema: consumers must
    # ignore fields they do not know, so adding an optional field breaks none of them.
    model_config = ConfigDict(
        frozen=True, extra="forbid", json_schema_extra={"additionalProperties": True}
    )


class Source(_Frozen):
    """The input record this prediction answers."""

    topic: str
    partition: int
    offset: int
    timestamp: int = Field(description="ms since the epoch, as Kafka reports it")


class ModelInfo(_Frozen):
    name: str
    weights: str = Field(description="random:SEED, torchvision:<weights>, file:NAME:sha256=…")
    device: str
    precision: str


class Label(_Frozen):
    index: int = Field(description="ImageNet class index")
    label: str
    score: float = Field(description="softmax probability")


class Timings(_Frozen):
    """Milliseconds spent in each stage by this record."""

    kafka_ms: float = Field(description="record timestamp -> fetched")
    permit_wait_ms: float
    decode_ms: float
    batch_wait_ms: float
    inference_ms: float = Field(description="the whole batch's forward pass")
    total_ms: float = Field(description="record timestamp -> prediction ready to send")


class Prediction(_Frozen):
    """The value of an output record (``content-type: application/json``)."""

    schema_version: Literal[1] = Field(
        description="changes only with a breaking change of this format (so does ce_type)"
    )
    id: str = Field(
        description="the input's id: its CloudEvents id (ce_id header, or a structured "
        "event's id), else topic/partition/offset; the output's ce_subject"
    )
    source: Source
    model: ModelInfo
    top_k: list[Label] = Field(description="sorted by score, highest first")
    batch_size: int | SkipJsonSchema[None] = Field(
        None,
        json_schema_extra=_no_default,
        description="records in the inference batch; only with include_timings",
    )
    timings: Timings | SkipJsonSchema[None] = Field(
        None, json_schema_extra=_no_default, description="only with include_timings"
    )

    def to_json(self) -> bytes:
        """The record value: optional fields that are not set are left out."""
        return self.model_dump_json(exclude_none=True).encode()


def prediction_json(
    input_id: str,
    source: tuple[str, int, int, int],
    model: dict[str, str],
    top_k: Sequence[tuple[int, str, float]],
    batch_size: int | None = None,
    timings_ms: dict[str, float] | None = None,
) -> bytes:
    """A ``Prediction``'s record value, built for the hot path without a model.

    The same JSON as ``Prediction(...).to_json()`` (tests/unit/test_contract.py
    compares the two, field by field): ``source`` is (topic, partition, offset,
    timestamp), ``model`` a ``ModelInfo`` dump, ``top_k`` (index, label, score);
    ``batch_size`` and ``timings_ms`` (the ``Timings`` fields) only when given.
    Validating a model per record cost the event loop more than the JSON itself;
    orjson writes a score that is not a number as null, as pydantic does.
    """
    topic, partition, offset, timestamp = source
    doc: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "id": input_id,
        "source": {
            "topic": topic,
            "partition": partition,
            "offset": offset,
            "timestamp": timestamp,
        },
        "model": model,
        "top_k": [{"index": i, "label": label, "score": score} for i, label, score in top_k],
    }
    if batch_size is not None:
        doc["batch_size"] = batch_size
    if timings_ms is not None:
        doc["timings"] = timings_ms
    return orjson.dumps(doc)


OWN_HEADER_PREFIX = "streamer-"
INPUT_HEADER_ESCAPE = "input-"


def _collides(name: str) -> bool:
    """Whether ``name`` is the service's, or one escaped to keep it apart."""
    while name.startswith(INPUT_HEADER_ESCAPE):
        name = name[len(INPUT_HEADER_ESCAPE) :]
    return name.startswith(OWN_HEADER_PREFIX)


def escape_input_header(name: str) -> str:
    """An input header's name as the service keeps it: ``input-`` before a name that is
    the service's (``streamer-*``) or an escaped one (``input-streamer-*``), so that no
    input header has one of the service's names and the mapping can be undone."""
    return INPUT_HEADER_ESCAPE + name if _collides(name) else name


def unescape_input_header(name: str) -> str:
    """The name as the producer wrote it (the inverse of ``escape_input_header``)."""
    if name.startswith(INPUT_HEADER_ESCAPE) and _collides(name[len(INPUT_HEADER_ESCAPE) :]):
        return name[len(INPUT_HEADER_ESCAPE) :]
    return name


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
