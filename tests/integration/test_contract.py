"""The message contract end to end: CloudEvents out, structured CloudEvents in, published schemas.

Images go in as binary-mode CloudEvents, as plain records and as one structured-mode
event; a bad image and a malformed structured event go in too. Every prediction must
be accepted by the CloudEvents SDK's Kafka binding and validate against the published
JSON Schemas; every dead letter's headers must validate against the published list.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jsonschema
import pytest
from cloudevents.core.bindings.kafka import KafkaMessage, from_binary_event, to_structured_event
from cloudevents.core.v1.event import CloudEvent

from streamer import corpus
from streamer.contract import CONTRACT_DIR
from streamer.schemas import (
    DLQ_CONSUMER_GROUP,
    DLQ_REASON,
    DLQ_STAGE,
    PREDICTION_TYPE,
)
from tests.integration.helpers import produce, read_exactly, running_service, service_settings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

TRACEPARENT = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def published(name: str) -> dict[str, Any]:
    return json.loads((CONTRACT_DIR / name).read_text())


def as_dict(headers: Any) -> dict[str, str]:
    return {k: (v or b"").decode("utf-8", "replace") for k, v in headers}


def structured(event_id: str, image: bytes) -> tuple[bytes, bytes, list[tuple[str, bytes]]]:
    """A structured-mode record made by the CloudEvents SDK (bytes go into data_base64)."""
    attributes = {
        "id": event_id,
        "source": "/tests/camera",
        "type": "com.example.image.captured",
        "specversion": "1.0",
        "datacontenttype": "image/jpeg",
    }
    message = to_structured_event(CloudEvent(attributes, image))
    assert b'"data_base64"' in message.value
    return event_id.encode(), message.value, list(message.headers.items())


async def test_outputs_follow_the_published_contract(
    kafka_bootstrap: str,
    kafka_options: dict[str, str],
    unique_name: str,
    new_topics,
    samples: list[corpus.Sample],
) -> None:
    settings = service_settings(kafka_bootstrap, unique_name)
    await new_topics("in", "out", "dlq", partitions=2)
    images = samples[:5]
    messages = [(s.name.encode(), s.data, [("ce_id", s.name.encode())]) for s in images]
    messages.append((b"traced", images[0].data, [("traceparent", TRACEPARENT)]))
    messages.append(structured("structured-1", images[1].data))
    bad_event = json.dumps({"specversion": "1.0", "id": "e", "source": "/s", "type": "t"})
    messages.append(
        (b"bad-event", bad_event.encode(), [("content-type", b"application/cloudevents+json")])
    )
    messages.append((b"bad-image", os.urandom(2048), [("ce_id", b"bad-image")]))

    async with running_service(settings):
        await produce(kafka_options, settings.input_topic, messages)
        outputs = await read_exactly(kafka_options, settings.output_topic, len(messages) - 2)
        dead = await read_exactly(kafka_options, settings.dlq_topic, 2)

    value_schema = published("prediction.schema.json")
    header_schema = published("prediction-headers.schema.json")
    by_key: dict[bytes, dict[str, Any]] = {}
    event_ids = set()
    for record in outputs:
        headers = dict(record.headers)
        event = from_binary_event(KafkaMessage(headers, record.key, record.value))
        body = event.get_data()
        jsonschema.validate(body, value_schema)
        jsonschema.validate(as_dict(record.headers), header_schema)
        assert "batch_size" not in body and "timings" not in body, "not without include_timings"
        assert event.get_type() == PREDICTION_TYPE
        assert event.get_source() == f"streamer/{settings.group_id}"
        assert event.get_subject() == body["id"]
        event_ids.add(event.get_id())
        by_key[record.key] = body
    assert len(event_ids) == len(outputs), "every output has its own ce_id"
    assert not event_ids & {s.name for s in images}, "the input's ce_id is not reused"
    assert sorted(by_key) == sorted(k for k, _, _ in messages[:-2])
    assert by_key[b"traced"]["id"].startswith(f"{settings.input_topic}/")
    traced = next(r for r in outputs if r.key == b"traced")
    assert dict(traced.headers)["traceparent"] == TRACEPARENT

    # The structured event was classified from its data_base64 and answered by its id.
    assert by_key[b"structured-1"]["id"] == "structured-1"
    from_event, from_bytes = (
        by_key[b"structured-1"]["top_k"],
        by_key[images[1].name.encode()]["top_k"],
    )
    assert [t["index"] for t in from_event] == [t["index"] for t in from_bytes]
    # The two rode in different batches: fp32 sums in another order at another batch size
    # (5e-8 apart in one CI run). The classes above must match exactly, in order.
    assert [t["score"] for t in from_event] == pytest.approx(
        [t["score"] for t in from_bytes], rel=0, abs=1e-5
    )

    dead_schema = published("dead-letter-headers.schema.json")
    reasons = {}
    for record in dead:
        headers = as_dict(record.headers)
        jsonschema.validate(headers, dead_schema)
        assert headers[DLQ_CONSUMER_GROUP] == settings.group_id
        reasons[record.key] = (headers[DLQ_REASON], headers[DLQ_STAGE])
    assert reasons == {
        b"bad-event": ("invalid-cloudevent", "intake"),
        b"bad-image": ("not-an-image", "decode"),
    }
    bad = next(r for r in dead if r.key == b"bad-event")
    assert bad.value == bad_event.encode(), "the dead letter keeps the input for replay"
    assert dict(bad.headers)["content-type"] == b"application/cloudevents+json"
