"""Dead letters are replayed once their cause is fixed: none lost, none duplicated."""

from __future__ import annotations

import json

import pytest

from streamer import corpus
from streamer.tools.replay import REPLAYED_FROM, ReplayFilter, replay
from tests.integration.helpers import (
    produce,
    read_all,
    read_exactly,
    running_service,
    service_settings,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


async def test_replay_republishes_matching_dead_letters_exactly_once(
    kafka_bootstrap: str,
    kafka_options: dict[str, str],
    unique_name: str,
    new_topics,
    samples: list[corpus.Sample],
) -> None:
    webp = [s for s in samples if s.format == "WEBP"][:5]
    jpeg = [s for s in samples if s.format == "JPEG"][:3]
    garbage = [(f"garbage-{i}", b"not an image at all") for i in range(2)]
    await new_topics("in", "out", "dlq", partitions=2)
    # The cause: WebP was left out of the allow-list.
    strict = service_settings(kafka_bootstrap, unique_name, allowed_formats=("JPEG", "PNG"))
    messages = [(s.name.encode(), s.data, [("ce_id", s.name.encode())]) for s in webp + jpeg]
    messages += [(n.encode(), v, [("ce_id", n.encode())]) for n, v in garbage]
    async with running_service(strict):
        await produce(kafka_options, strict.input_topic, messages)
        await read_exactly(kafka_options, strict.dlq_topic, len(webp) + len(garbage))
        await read_exactly(kafka_options, strict.output_topic, len(jpeg))

    # Fixed: WebP allowed again. Replay only the unsupported-format dead letters, twice.
    group = f"{unique_name}.replay"
    only_format = ReplayFilter(reasons=frozenset({"unsupported-format"}))
    first = await replay(kafka_options, strict.dlq_topic, strict.input_topic, group, only_format)
    again = await replay(kafka_options, strict.dlq_topic, strict.input_topic, group, only_format)
    assert (first.read, first.replayed) == (len(webp) + len(garbage), len(webp))
    assert (again.read, again.replayed) == (0, 0)

    fixed = service_settings(kafka_bootstrap, unique_name)  # same group: resumes after commits
    async with running_service(fixed):
        outputs = await read_exactly(kafka_options, fixed.output_topic, len(jpeg) + len(webp))
    ids = [json.loads(r.value)["id"] for r in outputs]
    assert sorted(ids) == sorted(s.name for s in webp + jpeg)

    replayed_inputs = [
        r
        for r in await read_all(kafka_options, fixed.input_topic)
        if any(k == REPLAYED_FROM for k, _ in r.headers)
    ]
    assert len(replayed_inputs) == len(webp)
    for record in replayed_inputs:
        keys = {k for k, _ in record.headers}
        assert "streamer-error-reason" not in keys and "ce_id" in keys
