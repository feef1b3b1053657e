"""Hostile record metadata (keys, header names and values) never stops or stalls the service.

Both findings were first reproduced by hand against a running service:

1. a header *name* that is not valid UTF-8 (kcat ``-H $'\\xff\\xfename=x'``) ended the
   intake loop, and after a restart the service read the same offset and died again;
2. a ``ce_id`` of invalid UTF-8 bytes is copied into the prediction (3 bytes of U+FFFD
   per byte in the JSON, plus the header), so the output outgrew the topic's limit: a
   crash loop in at-least-once and a partition stalled forever in exactly-once.

Each hostile record must become a dead letter with its reason, and the valid images
around it must be predicted, in both delivery modes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from streamer import corpus
from streamer.schemas import DLQ_REASON, DLQ_SOURCE_OFFSET
from tests.integration.helpers import (
    kcat,
    produce,
    read_exactly,
    running_service,
    service_settings,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(300),
    pytest.mark.skipif(shutil.which("kcat") is None, reason="kcat is installed by make test"),
]


@pytest.mark.parametrize("delivery", ["at-least-once", "exactly-once"])
async def test_hostile_metadata_is_dead_lettered_and_the_stream_goes_on(
    delivery: str,
    kafka_bootstrap: str,
    kafka_options: dict[str, str],
    unique_name: str,
    new_topics,
    samples: list[corpus.Sample],
    tmp_path: Path,
) -> None:
    settings = service_settings(kafka_bootstrap, unique_name, delivery=delivery)
    await new_topics("in", "out", "dlq", partitions=1)
    image = samples[0].data
    before = [(f"before-{i}".encode(), s.data, []) for i, s in enumerate(samples[1:4])]
    after = [(f"after-{i}".encode(), s.data, []) for i, s in enumerate(samples[4:7])]
    path = tmp_path / "image"
    path.write_bytes(image)

    async with running_service(settings) as service:
        await produce(kafka_options, settings.input_topic, before)  # offsets 0-2
        # Offset 3: a header name that is not UTF-8 (aiokafka's producer cannot send one).
        await kcat(
            "-P", "-b", kafka_bootstrap, "-t", settings.input_topic,
            "-k", "bad-header-name", "-H", "\udcff\udcfename=x", str(path),
        )  # fmt: skip
        # Offset 4: a 300 KB ce_id of invalid UTF-8, which used to triple in the output.
        await produce(
            kafka_options,
            settings.input_topic,
            [(b"huge-id", image, [("ce_id", b"\xff" * 300_000)])],
        )
        # Offset 5: a key far above the copy limit, on a valid image.
        await produce(kafka_options, settings.input_topic, [(b"k" * 200_000, image, [])])
        await produce(kafka_options, settings.input_topic, after)  # offsets 6-8

        predictions = await read_exactly(kafka_options, settings.output_topic, 6, timeout_s=120)
        dead = await read_exactly(kafka_options, settings.dlq_topic, 3, timeout_s=120)
        assert service.state.value == "running", "hostile metadata must not stop the service"

    keys = sorted(r.key for r in predictions)
    assert keys == sorted(k for k, _, _ in before + after)
    assert all(len(r.value) < 4096 for r in predictions)
    reasons = {
        int(dict(r.headers)[DLQ_SOURCE_OFFSET]): dict(r.headers)[DLQ_REASON].decode() for r in dead
    }
    assert reasons == {3: "undecodable-record", 4: "invalid-metadata", 5: "invalid-metadata"}
    bad_name = next(r for r in dead if r.key == b"bad-header-name")
    assert bad_name.value == image, "the dead letter keeps the original payload"
    # The undecodable name cannot be written back as a header name; it is kept escaped.
    assert ("\\xff\\xfename", b"x") in list(bad_name.headers)
    assert json.loads(predictions[0].value)["top_k"]
