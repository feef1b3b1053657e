"""Metadata limits, the oversize policy and the headers of outputs (``streamer.kafka.records``)."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime

import jsonschema
import pytest
from aiokafka import ConsumerRecord
from cloudevents.core.bindings.kafka import KafkaMessage, from_binary_event
from hypothesis import given
from hypothesis import strategies as st

from streamer.contract import CONTRACT_DIR
from streamer.errors import (
    DecodeError,
    InvalidMetadata,
    OutputRejected,
    RetriesExhausted,
    WorkerCrashed,
)
from streamer.kafka.records import (
    MAX_ID_BYTES,
    MAX_KEY_BYTES,
    MAX_TRACEPARENT_BYTES,
    OutputEvent,
    dead_letter,
    event_id,
    metadata_error,
    prediction,
    smaller,
    too_large_dead_letter,
    uuid5,
)
from streamer.schemas import (
    DLQ_ATTEMPTS,
    DLQ_CONSUMER_GROUP,
    DLQ_HEADERS,
    DLQ_HEADERS_DROPPED,
    DLQ_KEY_DROPPED_BYTES,
    DLQ_REASON,
    DLQ_STAGE,
    DLQ_VALUE_DROPPED_BYTES,
    PREDICTION_TYPE,
)

pytestmark = pytest.mark.timeout(10)


def record(key: bytes | None = b"k", headers: list | None = None) -> ConsumerRecord:
    headers = headers if headers is not None else [("ce_id", b"id-1"), ("x-user", b"u")]
    return ConsumerRecord("in", 2, 7, 1000, 0, key, b"image", None, 0, 0, tuple(headers))


@pytest.mark.parametrize(
    ("key", "headers"),
    [
        (b"k" * (MAX_KEY_BYTES + 1), []),
        (b"k", [("ce_id", b"\xff" * (MAX_ID_BYTES + 1))]),
        (b"k", [("traceparent", b"0" * (MAX_TRACEPARENT_BYTES + 1))]),
    ],
)
def test_metadata_above_its_limit_is_an_invalid_metadata_error(key: bytes, headers: list) -> None:
    error = metadata_error(record(key, headers))
    assert isinstance(error, InvalidMetadata) and error.reason == "invalid-metadata"


def test_metadata_at_its_limits_is_accepted() -> None:
    headers = [("ce_id", b"\xff" * MAX_ID_BYTES), ("traceparent", b"0" * MAX_TRACEPARENT_BYTES)]
    assert metadata_error(record(b"k" * MAX_KEY_BYTES, headers)) is None
    assert metadata_error(record(None, [("other", b"x" * 100_000), ("none", None)])) is None


def test_a_rejected_output_shrinks_one_step_at_a_time_until_nothing_is_left() -> None:
    source = record()
    output = prediction(source, "out", b"{}", "dlq")
    steps = [output]
    with pytest.raises(OutputRejected, match=r"max\.message\.bytes"):
        while True:
            steps.append(smaller(steps[-1]))
    _, letter, no_value, no_input_headers, no_key = steps
    assert letter.topic == "dlq" and dict(letter.headers)[DLQ_REASON] == b"output-too-large"
    assert letter.value == b"image" and letter.key == b"k"
    assert no_value.value is None and dict(no_value.headers)[DLQ_VALUE_DROPPED_BYTES] == b"5"
    names = [name for name, _ in no_input_headers.headers]
    assert "ce_id" not in names and "x-user" not in names
    assert dict(no_input_headers.headers)[DLQ_HEADERS_DROPPED] == b"2"
    assert no_key.key is None and dict(no_key.headers)[DLQ_KEY_DROPPED_BYTES] == b"1"


def schema(name: str) -> dict:
    return json.loads((CONTRACT_DIR / name).read_text())


def as_dict(headers: list[tuple[str, bytes]]) -> dict[str, str]:
    return {k: v.decode("utf-8", "replace") for k, v in headers}


def test_a_prediction_is_a_binary_mode_cloudevent_about_its_input() -> None:
    source = record(headers=[("ce_id", b"a"), ("traceparent", b"t"), ("secret", b"s")])
    event = OutputEvent.for_record(source, "group", "streamer/group")
    output = prediction(source, "out", b'{"x": 1}', "dlq", event=event)
    headers = dict(output.headers)
    assert headers["ce_id"] != b"a", "the output is a new event: it has its own id"
    assert headers["ce_subject"] == b"a"
    assert headers["traceparent"] == b"t"
    assert "secret" not in headers
    parsed = from_binary_event(KafkaMessage(headers, output.key, output.value or b""))
    assert parsed.get_id() == event.id and parsed.get_source() == "streamer/group"
    assert parsed.get_type() == PREDICTION_TYPE
    assert parsed.get_datacontenttype() == "application/json"
    assert parsed.get_data() == {"x": 1}
    jsonschema.validate(as_dict(output.headers), schema("prediction-headers.schema.json"))


def test_the_prediction_headers_schema_rejects_a_passed_through_input_id() -> None:
    old_style = {"content-type": "application/json", "ce_id": "a"}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(old_style, schema("prediction-headers.schema.json"))


def test_ce_time_is_rfc3339_utc_with_milliseconds() -> None:
    when = datetime(2026, 1, 2, 3, 4, 5, 678_901, tzinfo=UTC)
    event = OutputEvent("id", "src", "subject", time=when)
    assert dict(event.headers())["ce_time"] == b"2026-01-02T03:04:05.678Z"


def test_the_output_id_is_the_same_for_a_reprocessed_record_and_new_otherwise() -> None:
    first = event_id("g", record())
    assert first == event_id("g", record())
    assert uuid.UUID(first).version == 5
    other_offset = ConsumerRecord("in", 2, 8, 1000, 0, b"k", b"image", None, 0, 0, ())
    others = {
        event_id("g", other_offset),
        event_id("h", record()),
        event_id("g", record(), kind="other"),
    }
    assert first not in others and len(others) == 3


@given(namespace=st.uuids(), name=st.text())
def test_the_fast_uuid5_is_the_standard_librarys(namespace: uuid.UUID, name: str) -> None:
    assert uuid5(namespace, name) == str(uuid.uuid5(namespace, name))


def test_without_a_ce_id_the_subject_is_where_the_input_came_from() -> None:
    event = OutputEvent.for_record(record(headers=[]), "g")
    assert event.subject == "in/2/7" and event.traceparent is None


def test_a_dead_letter_keeps_the_input_and_names_group_and_attempts() -> None:
    source = record(headers=[("ce_id", b"a"), ("x-user", b"u")])
    error = DecodeError("bad", reason="corrupt")
    error.attempts = 2
    letter = dead_letter(source, error, "dlq", "the-group")
    headers = dict(letter.headers)
    assert letter.value == b"image" and letter.key == b"k"
    assert headers["ce_id"] == b"a" and headers["x-user"] == b"u"
    assert headers[DLQ_CONSUMER_GROUP] == b"the-group"
    assert headers[DLQ_ATTEMPTS] == b"2"
    assert set(DLQ_HEADERS) <= set(headers)
    jsonschema.validate(as_dict(letter.headers), schema("dead-letter-headers.schema.json"))


def test_a_decode_worker_crash_is_dead_lettered_at_the_decode_stage() -> None:
    error = RetriesExhausted(WorkerCrashed("decode", -9), stage="decode", attempts=3)
    headers = dict(dead_letter(record(), error, "dlq", "g").headers)
    assert headers[DLQ_STAGE] == b"decode"
    assert headers[DLQ_REASON] == b"worker-crashed"
    assert headers[DLQ_ATTEMPTS] == b"3"


def test_every_shrunk_dead_letter_still_has_the_published_headers() -> None:
    source = record()
    letter = too_large_dead_letter(source, "dlq", "g")
    published = schema("dead-letter-headers.schema.json")
    with pytest.raises(OutputRejected):
        while True:
            jsonschema.validate(as_dict(letter.headers), published)
            letter = smaller(letter)
