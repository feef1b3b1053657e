"""What the Kafka layer and the pipeline share: records, outcomes, dead letters, size limits.

A record's metadata is checked before its image is: a key or header that the
outputs would copy must be within the limits below, and a record aiokafka could not
read as the protocol defines it (``streamer.kafka.wire``) is dead-lettered at once.
These limits keep every prediction small, whatever the input carried:

================  ==========  ===================================================
what              limit       why
================  ==========  ===================================================
key               4096 bytes  copied as the key of the prediction and dead letter
``ce_id``         256 bytes   the prediction's ``id`` and ``ce_subject`` (UTF-8 or not)
``traceparent``   256 bytes   copied as a header (W3C's is 55 characters)
================  ==========  ===================================================

One oversize policy (``smaller``) applies to every outcome a topic rejects as too
large, one step per rejection:

1. a prediction becomes the record's dead letter, reason ``output-too-large``;
2. a dead letter loses its payload (``streamer-value-dropped-bytes`` says how much),
3. then the input's own headers (``streamer-headers-dropped``),
4. then its key (``streamer-key-dropped-bytes``);
5. after that nothing is left to drop, and ``OutputRejected`` stops the service: the
   dead-letter topic cannot hold a record of a few hundred bytes.

Every ``Outcome`` can be sent as it is (``Outcome.__post_init__``): it has a key or a
value (a dead letter of a tombstone, which has neither, gets an empty value), and its
header names are valid UTF-8. So a send can fail only for Kafka's reasons.

Input headers named like the service's own (``streamer-*``) are renamed when a record
enters (``in_own_namespace``; ``streamer.schemas.escape_input_header``), so the ladder
above and ``streamer replay`` only ever see the headers the service wrote.

A prediction is a CloudEvent in the Kafka binding's binary mode (``OutputEvent``). Its
``ce_id`` is new, not the input's, and deterministic (``event_id``): the output of the
same input record in the same consumer group always has the same id, so a duplicate
written again after a crash (at-least-once) carries the id of the first and consumers
can drop it. A dead letter is not a new event; it keeps the input's headers as they came.
"""

from __future__ import annotations

import functools
import hashlib
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import TypeAlias

from aiokafka import ConsumerRecord

from streamer.errors import (
    InvalidMetadata,
    OutputRejected,
    OutputTooLarge,
    RecordError,
    UndecodableRecord,
)
from streamer.kafka.wire import UNREADABLE
from streamer.schemas import (
    CE_ID,
    CE_SOURCE,
    CE_SPECVERSION,
    CE_SUBJECT,
    CE_TIME,
    CE_TYPE,
    DLQ_ATTEMPTS,
    DLQ_CLASS,
    DLQ_CONSUMER_GROUP,
    DLQ_HEADERS_DROPPED,
    DLQ_KEY_DROPPED_BYTES,
    DLQ_MESSAGE,
    DLQ_REASON,
    DLQ_SOURCE_OFFSET,
    DLQ_SOURCE_PARTITION,
    DLQ_SOURCE_TIMESTAMP,
    DLQ_SOURCE_TOPIC,
    DLQ_STAGE,
    DLQ_VALUE_DROPPED_BYTES,
    HEADER_CONTENT_TYPE,
    HEADER_ID,
    HEADER_TRACEPARENT,
    JSON_CONTENT_TYPE,
    MAX_ERROR_MESSAGE_CHARS,
    OWN_HEADER_PREFIX,
    PREDICTION_TYPE,
    SPECVERSION,
    Headers,
    escape_input_header,
    header,
    record_id,
)

Record: TypeAlias = ConsumerRecord[bytes, bytes]

MAX_KEY_BYTES = 4096
MAX_ID_BYTES = 256
MAX_TRACEPARENT_BYTES = 256
_HEADER_LIMITS = ((HEADER_ID, MAX_ID_BYTES), (HEADER_TRACEPARENT, MAX_TRACEPARENT_BYTES))
# Fixed for good: every output id is derived from it (``event_id``).
EVENT_ID_NAMESPACE = uuid.UUID("8d0c7c3e-55a1-4d0e-9a43-2f6b1c9e7d21")
DEFAULT_SOURCE = "streamer"


@dataclass(frozen=True)
class Outcome:
    """One message to publish for one input record: its prediction or its dead letter."""

    topic: str
    value: bytes | None
    key: bytes | None
    headers: Headers
    dead_letter_reason: str | None = None  # None: a prediction
    # What a prediction becomes when the output topic rejects it as too large: built
    # only then (it is rare, and building it for every output cost the event loop).
    too_large: Callable[[], Outcome] | None = None

    def __post_init__(self) -> None:
        # What the Kafka client asserts or fails to encode, checked where the outcome is
        # made (inside the record's boundary), not when a transaction sends it.
        if self.key is None and self.value is None:
            raise ValueError("an outcome needs a key or a value")
        for name, _ in self.headers:
            if not _is_utf8(name):
                raise ValueError(f"header name {_writable(name)[:100]!r} is not valid UTF-8")


def smaller(outcome: Outcome) -> Outcome:
    """The next smaller form of an outcome a topic rejected as too large (module docstring)."""
    if outcome.dead_letter_reason is None:
        if outcome.too_large is None:
            raise OutputRejected("a prediction was rejected as too large and has no dead letter")
        return outcome.too_large()
    if outcome.value:
        size = str(len(outcome.value)).encode()
        headers = [*outcome.headers, (DLQ_VALUE_DROPPED_BYTES, size)]
        return replace(outcome, value=_none_or_empty(outcome.key), headers=headers)
    # Input headers never carry the service's names (``in_own_namespace``).
    own = [(k, v) for k, v in outcome.headers if k.startswith(OWN_HEADER_PREFIX)]
    if len(own) < len(outcome.headers):
        dropped = str(len(outcome.headers) - len(own)).encode()
        return replace(outcome, headers=[*own, (DLQ_HEADERS_DROPPED, dropped)])
    if outcome.key is not None:
        size = str(len(outcome.key)).encode()
        value = outcome.value if outcome.value is not None else b""
        headers = [*own, (DLQ_KEY_DROPPED_BYTES, size)]
        return replace(outcome, key=None, value=value, headers=headers)
    raise OutputRejected(
        f"the topic {outcome.topic!r} rejected a {sum(len(v or b'') for _, v in own)}-byte "
        "dead letter with nothing left to drop: check its max.message.bytes"
    )


def _none_or_empty(key: bytes | None) -> bytes | None:
    """A dropped value: None (null) when the key remains, else empty (Kafka clients send
    no record without both)."""
    return None if key is not None else b""


def in_own_namespace(record: Record) -> Record:
    """``record`` with its headers named like the service's renamed (module docstring);
    the same object when none is (the common case costs one scan of the names)."""
    headers = record.headers
    if not any(name.startswith(("streamer-", "input-")) for name, _ in headers or ()):
        return record
    renamed = tuple((escape_input_header(name), value) for name, value in headers)
    return replace(record, headers=renamed)


def metadata_error(record: Record) -> RecordError | None:
    """Why the record's key or headers cannot be used, or None when they can."""
    for name, value in record.headers or ():
        if name == UNREADABLE:
            return UndecodableRecord((value or b"").decode("utf-8", "replace"))
        if not _is_utf8(name):
            shown = _writable(name)[:100]  # a name can be as large as the record
            return UndecodableRecord(f"header name {shown!r} is not valid UTF-8")
    if record.key is not None and len(record.key) > MAX_KEY_BYTES:
        return InvalidMetadata(f"key is {len(record.key)} bytes; the limit is {MAX_KEY_BYTES}")
    for name, limit in _HEADER_LIMITS:
        value = header(record.headers, name)
        if value is not None and len(value) > limit:
            return InvalidMetadata(f"{name} header is {len(value)} bytes; the limit is {limit}")
    return None


def event_id(group: str, record: Record, kind: str = "prediction") -> str:
    """The ``ce_id`` of the ``kind`` output of ``record`` in consumer group ``group``.

    A UUID (version 5) of ``<group>/<topic>/<partition>/<offset>/<kind>``: the same
    record processed again by the same group gets the same id (consumers de-duplicate
    on it), another group or another record gets another.
    """
    name = f"{group}/{record.topic}/{record.partition}/{record.offset}/{kind}"
    return uuid5(EVENT_ID_NAMESPACE, name)


def uuid5(namespace: uuid.UUID, name: str) -> str:
    """``str(uuid.uuid5(namespace, name))`` at a third of its cost (once per output)."""
    digest = bytearray(hashlib.sha1(namespace.bytes + name.encode("utf-8")).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x50  # version 5
    digest[8] = (digest[8] & 0x3F) | 0x80  # RFC 4122 variant
    h = digest.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _now() -> datetime:
    return datetime.now(UTC)


_SPECVERSION = SPECVERSION.encode()
_JSON_CONTENT_TYPE = JSON_CONTENT_TYPE.encode()


def ce_time(when: datetime) -> bytes:
    """RFC 3339 in UTC with milliseconds: ``2026-01-02T03:04:05.678Z``."""
    utc = when.astimezone(UTC)
    return b"%s.%03dZ" % (_to_the_second(utc.replace(microsecond=0)), utc.microsecond // 1000)


@functools.lru_cache(maxsize=4)
def _to_the_second(when: datetime) -> bytes:  # once a second, not once an output
    return when.strftime("%Y-%m-%dT%H:%M:%S").encode()


@dataclass(frozen=True)
class OutputEvent:
    """The CloudEvents context of one prediction, written as binary-mode headers."""

    id: str
    source: str
    subject: str
    traceparent: bytes | None = None
    type: str = PREDICTION_TYPE
    time: datetime = field(default_factory=_now)

    @classmethod
    def for_record(
        cls,
        record: Record,
        group: str = "",
        source: str = DEFAULT_SOURCE,
        subject: str | None = None,
        traceparent: bytes | None = None,
    ) -> OutputEvent:
        """By default the subject and trace context are the input's headers."""
        if subject is None:
            subject = record_id(record.headers, record.topic, record.partition, record.offset)
        if traceparent is None:
            traceparent = header(record.headers, HEADER_TRACEPARENT)
        return cls(event_id(group, record), source, subject, traceparent or None)

    def headers(self) -> Headers:
        headers: Headers = [
            (CE_SPECVERSION, _SPECVERSION),
            (CE_ID, self.id.encode()),
            (CE_SOURCE, self.source.encode()),
            (CE_TYPE, self.type.encode()),
            (CE_SUBJECT, self.subject.encode("utf-8", errors="replace")),
            (CE_TIME, ce_time(self.time)),
            (HEADER_CONTENT_TYPE, _JSON_CONTENT_TYPE),
        ]
        if self.traceparent:
            headers.append((HEADER_TRACEPARENT, self.traceparent))
        return headers


def prediction(
    record: Record,
    topic: str,
    value: bytes,
    dead_letter_topic: str,
    group: str = "",
    event: OutputEvent | None = None,
) -> Outcome:
    """The prediction's message: the input's key, the event's headers (module docstring).

    Nothing else of the input's headers is copied: its ``ce_id`` becomes ``ce_subject``.
    Should the output topic reject it as too large, it becomes the record's dead letter
    in ``dead_letter_topic`` (``smaller``).
    """
    event = event or OutputEvent.for_record(record)
    too_large = functools.partial(too_large_dead_letter, record, dead_letter_topic, group)
    return Outcome(topic, value, record.key, event.headers(), too_large=too_large)


def dead_letter(record: Record, error: RecordError, topic: str, group: str = "") -> Outcome:
    """The input's value, key and headers, plus the headers that say what went wrong.

    Header names that are not UTF-8 cannot be written back as they came (the Kafka
    client encodes names as UTF-8); they are kept with their bytes escaped (``\\xff``).
    """
    original = [(_writable(k), v) for k, v in record.headers or () if k != UNREADABLE]
    headers = original + dead_letter_headers(record, error, group)
    value = record.value if record.value is not None else _none_or_empty(record.key)
    return Outcome(topic, value, record.key, headers, error.reason)


def too_large_dead_letter(record: Record, topic: str, group: str = "") -> Outcome:
    error = OutputTooLarge("the prediction is larger than the output topic accepts")
    return dead_letter(record, error, topic, group)


def dead_letter_headers(record: Record, error: RecordError, group: str = "") -> Headers:
    """The ``DLQ_HEADERS`` (docs/contract/dead-letter-headers.md)."""
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
        (DLQ_CONSUMER_GROUP, group.encode()),
        (DLQ_ATTEMPTS, str(error.attempts).encode()),
    ]


def _is_utf8(name: str) -> bool:
    if name.isascii():
        return True
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # surrogate escapes of bytes that were not UTF-8
        return False
    return True


def _writable(name: str) -> str:
    """A header name the producer can encode: undecodable bytes as ``\\xNN``."""
    if _is_utf8(name):
        return name
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
