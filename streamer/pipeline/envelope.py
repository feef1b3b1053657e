"""How an input record carries its image: plain or binary-mode CloudEvent, or structured mode.

Two forms are accepted (the CloudEvents Kafka protocol binding tells them apart by
the ``content-type`` header):

- **binary** (and plain records): the value is the image; the id is the ``ce_id``
  header when present, else ``topic/partition/offset``;
- **structured**: ``content-type: application/cloudevents+json`` (parameters such as
  ``; charset=utf-8`` allowed); the value is one JSON CloudEvent whose ``data_base64``
  is the image and whose ``id`` is the id. ``specversion`` must be ``1.0`` and
  ``id``, ``source`` and ``type`` non-empty strings, as the specification requires;
  a ``traceparent`` attribute (distributed tracing extension) is used when the
  record has no ``traceparent`` header. Anything else in the event is ignored.

A structured record that breaks these rules is dead-lettered as ``invalid-cloudevent``,
and so is any other ``application/cloudevents*`` type (batches are not accepted). Its
id and ``traceparent`` have the limits of their headers (``invalid-metadata``), and the
decoded image the ``max_payload_bytes`` limit (``payload-too-large``), checked before
the base64 text is decoded.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any

from streamer.errors import InvalidCloudEvent, InvalidMetadata, PayloadTooLarge
from streamer.kafka.records import MAX_ID_BYTES, MAX_TRACEPARENT_BYTES, Record
from streamer.schemas import (
    HEADER_CONTENT_TYPE,
    HEADER_TRACEPARENT,
    SPECVERSION,
    STRUCTURED_CONTENT_TYPE,
    header,
    record_id,
)

_CLOUDEVENTS_PREFIX = "application/cloudevents"
_REQUIRED = ("id", "source", "type")


@dataclass(frozen=True)
class Envelope:
    """What the pipeline needs from an input record, whichever form it came in."""

    image: bytes
    id: str
    traceparent: bytes | None
    structured: bool = False


def media_type(record: Record) -> str:
    """The record's ``content-type`` without parameters, lower case ('' when absent)."""
    raw = header(record.headers, HEADER_CONTENT_TYPE) or b""
    return raw.decode("utf-8", "replace").split(";", 1)[0].strip().lower()


def is_structured(record: Record) -> bool:
    return media_type(record).startswith(_CLOUDEVENTS_PREFIX)


def open_envelope(record: Record, max_payload_bytes: int) -> Envelope:
    """The image, id and trace context of ``record`` (raises a ``RecordError`` if unusable)."""
    traceparent = header(record.headers, HEADER_TRACEPARENT) or None
    if not is_structured(record):
        rid = record_id(record.headers, record.topic, record.partition, record.offset)
        return Envelope(record.value or b"", rid, traceparent)
    kind = media_type(record)
    if kind != STRUCTURED_CONTENT_TYPE:
        raise InvalidCloudEvent(
            f"content-type {_shown(kind)} is not accepted; use binary mode or "
            f"{STRUCTURED_CONTENT_TYPE}"
        )
    event = _parse(record.value or b"")
    data = _data_base64(event, max_payload_bytes)
    event_id = event["id"]
    try:
        id_bytes = event_id.encode("utf-8")
    except UnicodeEncodeError as exc:  # JSON can escape a lone surrogate; no output can hold it
        raise InvalidCloudEvent(f"the event's id is not valid Unicode: {exc}") from exc
    if len(id_bytes) > MAX_ID_BYTES:
        raise InvalidMetadata(f"the event's id is above the limit of {MAX_ID_BYTES} bytes")
    if traceparent is None and isinstance(event.get("traceparent"), str):
        traceparent = event["traceparent"].encode("utf-8", "replace") or None
        if traceparent is not None and len(traceparent) > MAX_TRACEPARENT_BYTES:
            raise InvalidMetadata(
                f"the event's traceparent is above the limit of {MAX_TRACEPARENT_BYTES} bytes"
            )
    return Envelope(data, event_id, traceparent, structured=True)


def _parse(value: bytes) -> dict[str, Any]:
    try:
        event = json.loads(value)
    except ValueError as exc:  # not JSON, not UTF-8, or a number over int's digit limit
        raise InvalidCloudEvent(f"structured event is not valid JSON: {exc}") from exc
    except RecursionError as exc:  # nested deeper than the parser's recursion limit
        raise InvalidCloudEvent("structured event is nested too deeply to parse") from exc
    if not isinstance(event, dict):
        raise InvalidCloudEvent(f"structured event is a JSON {type(event).__name__}, not an object")
    if event.get("specversion") != SPECVERSION:
        raise InvalidCloudEvent(
            f"specversion is {_shown(event.get('specversion'))}; only {SPECVERSION!r} is accepted"
        )
    for name in _REQUIRED:
        if not isinstance(event.get(name), str) or not event[name]:
            raise InvalidCloudEvent(f"required attribute {name!r} is missing or not a string")
    return event


def _shown(value: object, limit: int = 80) -> str:
    """``repr(value)`` for a message, at most ``limit`` characters: a producer chose it.

    A deeply nested value is not walked: only its type is named."""
    if not isinstance(value, str | int | float | bool | type(None)):
        return f"a JSON {type(value).__name__}"
    text = repr(value[: limit + 1] if isinstance(value, str) else value)
    return text if len(text) <= limit else text[:limit] + "..."


def _data_base64(event: dict[str, Any], limit: int) -> bytes:
    text = event.get("data_base64")
    if not isinstance(text, str):
        where = "'data' (images must be binary)" if "data" in event else "no data"
        raise InvalidCloudEvent(f"the image must be in 'data_base64'; the event has {where}")
    # base64 is 4 characters per 3 bytes: refuse an oversized image before decoding it.
    size = len(text) * 3 // 4 - text.count("=", -2)
    if size > limit:
        raise PayloadTooLarge(f"payload of {size} bytes (decoded) exceeds {limit}")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidCloudEvent(f"data_base64 is not valid base64: {exc}") from exc
