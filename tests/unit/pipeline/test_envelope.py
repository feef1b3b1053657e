"""Binary and structured-mode CloudEvents input (``streamer.pipeline.envelope``)."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from aiokafka import ConsumerRecord

from streamer.errors import InvalidCloudEvent, InvalidMetadata, PayloadTooLarge
from streamer.kafka.records import MAX_ID_BYTES
from streamer.pipeline.envelope import open_envelope

pytestmark = pytest.mark.timeout(10)

IMAGE = b"\xff\xd8\xff\xe0 pretend this is a JPEG"
LIMIT = 1024


def record(value: bytes, headers: list[tuple[str, bytes]]) -> ConsumerRecord:
    return ConsumerRecord("in", 1, 5, 1000, 0, b"k", value, None, 0, 0, tuple(headers))


def event(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "specversion": "1.0",
        "id": "event-1",
        "source": "/cameras/7",
        "type": "com.example.image.captured",
        "datacontenttype": "image/jpeg",
        "data_base64": base64.b64encode(IMAGE).decode(),
    }
    body.update(overrides)
    return {k: v for k, v in body.items() if v is not None}


def structured(body: Any, content_type: bytes = b"application/cloudevents+json") -> ConsumerRecord:
    value = body if isinstance(body, bytes) else json.dumps(body).encode()
    return record(value, [("content-type", content_type)])


def test_a_binary_record_is_its_own_image_with_its_ce_id() -> None:
    opened = open_envelope(record(IMAGE, [("ce_id", b"abc"), ("traceparent", b"00-t")]), LIMIT)
    assert (opened.image, opened.id, opened.traceparent, opened.structured) == (
        IMAGE,
        "abc",
        b"00-t",
        False,
    )
    assert open_envelope(record(IMAGE, [("content-type", b"image/jpeg")]), LIMIT).id == "in/1/5"


@pytest.mark.parametrize(
    "content_type",
    [b"application/cloudevents+json", b"Application/CloudEvents+JSON; charset=utf-8"],
)
def test_a_structured_event_gives_its_decoded_data_and_its_id(content_type: bytes) -> None:
    opened = open_envelope(structured(event(), content_type), LIMIT)
    assert opened.image == IMAGE and opened.id == "event-1" and opened.structured


def test_the_trace_context_comes_from_the_header_first_then_the_event() -> None:
    body = event(traceparent="00-from-event")
    assert open_envelope(structured(body), LIMIT).traceparent == b"00-from-event"
    both = record(
        json.dumps(body).encode(),
        [("content-type", b"application/cloudevents+json"), ("traceparent", b"00-header")],
    )
    assert open_envelope(both, LIMIT).traceparent == b"00-header"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (b"{not json", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b"[1, 2]", "not an object"),
        (event(specversion="0.3"), "specversion"),
        (event(id=None), "'id'"),
        (event(id=""), "'id'"),
        (event(source=7), "'source'"),
        (event(type=None), "'type'"),
        (event(data_base64=None), "no data"),
        (event(data_base64=None, data={"pixels": []}), "'data'"),
        (event(data_base64="***"), "not valid base64"),
    ],
)
def test_a_malformed_structured_event_is_an_invalid_cloudevent(value: Any, message: str) -> None:
    with pytest.raises(InvalidCloudEvent, match=message) as caught:
        open_envelope(structured(value), LIMIT)
    assert caught.value.reason == "invalid-cloudevent" and caught.value.stage == "intake"


def test_a_batch_of_events_is_not_accepted() -> None:
    batch = structured([event()], b"application/cloudevents-batch+json")
    with pytest.raises(InvalidCloudEvent, match="cloudevents-batch"):
        open_envelope(batch, LIMIT)


def test_the_decoded_image_is_held_to_max_payload_bytes() -> None:
    at_limit = event(data_base64=base64.b64encode(b"x" * LIMIT).decode())
    assert len(open_envelope(structured(at_limit), LIMIT).image) == LIMIT
    # Twice the limit, but not even valid base64: refused by its size before decoding.
    over = event(data_base64="A" * (LIMIT * 4 // 3 + 8) + "!")
    with pytest.raises(PayloadTooLarge):
        open_envelope(structured(over), LIMIT)


def test_a_structured_id_above_the_ce_id_limit_is_invalid_metadata() -> None:
    with pytest.raises(InvalidMetadata):
        open_envelope(structured(event(id="i" * (MAX_ID_BYTES + 1))), LIMIT)
    assert open_envelope(structured(event(id="i" * MAX_ID_BYTES)), LIMIT).id == "i" * MAX_ID_BYTES
