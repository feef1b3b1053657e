"""Metadata limits and the one oversize policy (``streamer.kafka.records``)."""

from __future__ import annotations

import pytest
from aiokafka import ConsumerRecord

from streamer.errors import InvalidMetadata, OutputRejected
from streamer.kafka.records import (
    MAX_ID_BYTES,
    MAX_KEY_BYTES,
    MAX_TRACEPARENT_BYTES,
    metadata_error,
    prediction,
    smaller,
    too_large_dead_letter,
)
from streamer.schemas import (
    DLQ_HEADERS_DROPPED,
    DLQ_KEY_DROPPED_BYTES,
    DLQ_REASON,
    DLQ_VALUE_DROPPED_BYTES,
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
    output = prediction(source, "out", b"{}", too_large_dead_letter(source, "dlq"))
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


def test_a_prediction_keeps_only_the_id_and_trace_headers() -> None:
    source = record(headers=[("ce_id", b"a"), ("traceparent", b"t"), ("secret", b"s")])
    output = prediction(source, "out", b"{}", too_large_dead_letter(source, "dlq"))
    assert output.headers == [
        ("content-type", b"application/json"),
        ("ce_id", b"a"),
        ("traceparent", b"t"),
    ]
