"""The event loop is never blocked by decode or inference."""

from __future__ import annotations

import json

import pytest

from streamer import corpus
from tests.integration.helpers import produce, read_exactly, running_service, service_settings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


async def test_loop_lag_stays_low_while_long_batches_run(
    kafka_bootstrap: str,
    kafka_options: dict[str, str],
    unique_name: str,
    new_topics,
    samples: list[corpus.Sample],
) -> None:
    # Big batches: each forward pass takes far longer than the 100 ms lag budget.
    settings = service_settings(
        kafka_bootstrap,
        unique_name,
        max_batch_size=32,
        batch_size_from_table=False,  # the table may choose batches too short for this test
        max_batch_delay_ms=500,
        max_in_flight=96,
        include_timings=True,
    )
    await new_topics("in", "out", "dlq", partitions=3)
    images = samples[:96]
    async with running_service(settings) as service:
        service.loop_lag.reset()
        await produce(
            kafka_options, settings.input_topic, [(s.name.encode(), s.data, []) for s in images]
        )
        outputs = await read_exactly(kafka_options, settings.output_topic, len(images))
        max_lag_s, samples_taken = service.loop_lag.max_s, service.loop_lag.samples

    forward_ms = max(json.loads(r.value)["timings"]["inference_ms"] for r in outputs)
    print(
        f"max forward pass {forward_ms:.0f} ms, max loop lag {max_lag_s * 1000:.1f} ms "
        f"over {samples_taken} samples"
    )
    assert forward_ms > 500, "the batches must be long enough for the test to mean anything"
    assert samples_taken > 20
    assert max_lag_s < 0.100
