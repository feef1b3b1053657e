"""Instances in one consumer group share the input; killing one and adding another loses nothing.

In exactly-once mode nothing is duplicated either: the new owner of a partition
fences the killed owner's transactional producer, aborting its open transaction.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from streamer import corpus
from tests.integration.helpers import (
    ServiceProcess,
    committed_and_end,
    count_by_id,
    output_ids,
    produce,
    read_all,
    service_settings,
    wait_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]


@pytest.mark.parametrize("delivery", ["at-least-once", "exactly-once"])
async def test_kill_one_of_two_instances_then_add_a_third(
    kafka_bootstrap: str,
    kafka_options: dict[str, str],
    unique_name: str,
    new_topics,
    samples: list[corpus.Sample],
    tmp_path: Path,
    delivery: str,
) -> None:
    settings = service_settings(
        kafka_bootstrap,
        unique_name,
        max_batch_size=8,
        inference_threads=1,
        max_in_flight=16,
        delivery=delivery,
    )
    await new_topics("in", "out", "dlq", partitions=4)
    images = samples[:120]
    expected = {s.name for s in images}
    await produce(
        kafka_options,
        settings.input_topic,
        [(s.name.encode(), s.data, [("ce_id", s.name.encode())]) for s in images],
    )
    instances = {name: ServiceProcess(settings, tmp_path / f"{name}.log") for name in "abc"}

    async def at_least_twenty() -> bool:
        return len(await output_ids(kafka_options, settings.output_topic)) >= 20

    async def all_predicted() -> bool:
        return expected <= await output_ids(kafka_options, settings.output_topic)

    try:
        instances["a"].start()
        instances["b"].start()
        await wait_for(at_least_twenty, 600, "predictions from the group")
        instances["a"].kill()
        instances["c"].start()
        await wait_for(all_predicted, 600, "every input predicted")
        for name in "bc":
            instances[name].check_alive()

        async def committed_to_end() -> bool:
            committed, end = await committed_and_end(
                kafka_options, settings.group_id, settings.input_topic
            )
            return all(committed.get(p) == e for p, e in end.items())

        await wait_for(committed_to_end, 120, "the group's offsets to reach the end")
        assert instances["b"].terminate() == 0, instances["b"].log()
        assert instances["c"].terminate() == 0, instances["c"].log()
    finally:
        for instance in instances.values():
            if instance.process is not None and instance.process.poll() is None:
                instance.kill()

    outputs = await read_all(kafka_options, settings.output_topic)
    assert {json.loads(r.value)["id"] for r in outputs} == expected
    distinct, duplicates = count_by_id(outputs)
    if delivery == "exactly-once":
        assert duplicates == 0
    print(f"delivery={delivery} inputs={distinct} outputs={len(outputs)} duplicates={duplicates}")
