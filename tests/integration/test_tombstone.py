"""A tombstone (no key, no value: what a compacting producer sends to delete) is answered in
either delivery mode, and the records behind it on its partition are predicted."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from streamer import corpus
from streamer.schemas import DLQ_REASON, DLQ_SOURCE_OFFSET, header
from tests.integration.helpers import kcat, read_exactly, running_service, service_settings

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(300),
    pytest.mark.skipif(shutil.which("kcat") is None, reason="kcat is installed by make test"),
]


@pytest.mark.parametrize("delivery", ["at-least-once", "exactly-once"])
async def test_a_tombstone_gets_a_dead_letter_and_the_photos_behind_it_predictions(
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
    photos = []
    for sample in samples[:3]:
        photos.append(tmp_path / sample.name)
        photos[-1].write_bytes(sample.data)
    target = ["-b", kafka_bootstrap, "-t", settings.input_topic]
    # With a key delimiter, -Z sends an empty key and an empty value as NULL: a tombstone.
    await kcat("-P", "-Z", "-K:", *target, stdin=b":\n")
    await kcat("-P", *target, *map(str, photos))  # a message per file, behind it

    async with running_service(settings):
        predictions = await read_exactly(kafka_options, settings.output_topic, 3, timeout_s=180)
        [letter] = await read_exactly(kafka_options, settings.dlq_topic, 1, timeout_s=60)
    assert sorted(json.loads(p.value)["source"]["offset"] for p in predictions) == [1, 2, 3]
    assert header(letter.headers, DLQ_SOURCE_OFFSET) == b"0"
    assert header(letter.headers, DLQ_REASON) == b"empty"
    assert letter.key is None and letter.value == b""
