"""5% hostile payloads among real images: each is dead-lettered with its reason."""

from __future__ import annotations

import json

import pytest

from streamer import corpus
from streamer.schemas import DLQ_REASON
from tests.hostile import hostile_payloads
from tests.integration.helpers import produce, read_exactly, running_service, service_settings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


async def test_hostile_payloads_are_isolated_and_valid_images_are_unaffected(
    kafka_bootstrap: str,
    kafka_options: dict[str, str],
    unique_name: str,
    new_topics,
    samples: list[corpus.Sample],
) -> None:
    valid = samples[:114]
    jpeg = next(s.data for s in samples if s.format == "JPEG")
    hostile = hostile_payloads(jpeg)  # 6 of 120 records: 5%
    settings = service_settings(kafka_bootstrap, unique_name, max_payload_bytes=640 * 1024)
    await new_topics("in", "out", "dlq", partitions=3)
    messages = [(s.name.encode(), s.data, [("ce_id", s.name.encode())]) for s in valid]
    # Spread the hostile ones through the stream rather than at the end.
    for i, (name, (payload, _)) in enumerate(hostile.items()):
        messages.insert(10 + i * 18, (name.encode(), payload, [("ce_id", name.encode())]))

    async with running_service(settings) as service:
        await produce(kafka_options, settings.input_topic, messages)
        outputs = await read_exactly(kafka_options, settings.output_topic, len(valid))
        dead = await read_exactly(kafka_options, settings.dlq_topic, len(hostile))
        restarts = sum(
            service.metrics.worker_restarts.labels(kind)._value.get()
            for kind in ("decode", "inference")
        )

    assert {json.loads(r.value)["id"] for r in outputs} == {s.name for s in valid}
    reasons = {r.key.decode(): dict(r.headers)[DLQ_REASON].decode() for r in dead}
    assert reasons == {name: reason for name, (_, reason) in hostile.items()}
    assert restarts == 0, "hostile input must never crash a worker"
