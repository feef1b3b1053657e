"""Exactly-once mode: outputs and offsets in one transaction per input partition."""

from __future__ import annotations

import json
import os

import pytest

from streamer import corpus
from streamer.schemas import DLQ_REASON
from tests.integration.helpers import (
    committed_and_end,
    output_ids,
    produce,
    read_all,
    running_service,
    service_settings,
    wait_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


async def test_each_input_has_one_committed_output_and_offsets_commit_with_it(
    kafka_bootstrap: str,
    kafka_options: dict[str, str],
    unique_name: str,
    new_topics,
    samples: list[corpus.Sample],
) -> None:
    settings = service_settings(kafka_bootstrap, unique_name, delivery="exactly-once")
    await new_topics("in", "out", "dlq", partitions=3)
    images = samples[:40]
    bad = {"bad-random": os.urandom(1024), "bad-empty": b"", "bad-text": b"not an image"}
    messages = [(s.name.encode(), s.data, [("ce_id", s.name.encode())]) for s in images]
    messages += [(k.encode(), v, [("ce_id", k.encode())]) for k, v in bad.items()]

    async with running_service(settings) as service:
        await produce(kafka_options, settings.input_topic, messages)

        async def all_committed() -> bool:
            committed, end = await committed_and_end(
                kafka_options, settings.group_id, settings.input_topic
            )
            return all(committed.get(p) == e for p, e in end.items())

        await wait_for(all_committed, 300, "offsets committed by the transactions")
        transactions = service.metrics.transactions.labels("committed")._value.get()
        consumer_commits = service.metrics.commits.labels("ok")._value.get()

    # A commit's markers reach each output partition shortly after the offsets are
    # visible, so read_committed readers may need a moment to see the last outputs.
    async def all_visible() -> bool:
        predicted = await output_ids(kafka_options, settings.output_topic)
        dead = await read_all(kafka_options, settings.dlq_topic)
        return len(predicted) == len(images) and len(dead) == len(bad)

    await wait_for(all_visible, 60, "every committed output to be visible")
    outputs = await read_all(kafka_options, settings.output_topic)
    ids = [json.loads(r.value)["id"] for r in outputs]
    assert sorted(ids) == sorted(s.name for s in images)  # each once, read_committed
    dead = await read_all(kafka_options, settings.dlq_topic)
    assert sorted(r.key.decode() for r in dead) == sorted(bad)
    assert all(dict(r.headers)[DLQ_REASON] for r in dead)
    # Offsets went through the transactions, never through the consumer's own commits.
    assert transactions >= 1
    assert consumer_commits == 0
    # Nothing was aborted along the way: uncommitted reads see the same records.
    uncommitted = await read_all(kafka_options, settings.output_topic, "read_uncommitted")
    assert len(uncommitted) == len(outputs)
