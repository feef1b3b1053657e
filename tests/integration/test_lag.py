"""``streamer lag`` reads a group's lag from the brokers, with no instance of the service running.

Records go to chosen partitions, a plain consumer commits offsets for part of
them, and the tool must report, per partition: end minus committed, and, where
nothing is committed, every record (``auto_offset_reset`` is ``earliest``).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import OffsetAndMetadata, TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from streamer.tools.lag import LagExporter
from tests.httpclient import request
from tests.integration.helpers import wait_for
from tests.integration.test_tools_cli import one_line_error, streamer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

RECORDS = {0: 5, 1: 6, 2: 7}  # records produced per partition
COMMITTED = {0: 2, 1: 6}  # the group's commits; partition 2: none
EXPECTED_LAG = {0: 3, 1: 0, 2: 7}


async def produce_to_partitions(options: dict[str, Any], topic: str) -> None:
    producer = AIOKafkaProducer(**options)
    await producer.start()
    try:
        for partition, count in RECORDS.items():
            for i in range(count):
                await producer.send_and_wait(topic, f"r{i}".encode(), partition=partition)
    finally:
        await producer.stop()


async def commit(options: dict[str, Any], group: str, offsets: dict[TopicPartition, int]) -> None:
    """Commit like a group member would, without joining (manual assignment)."""
    consumer = AIOKafkaConsumer(group_id=group, enable_auto_commit=False, **options)
    await consumer.start()
    try:
        consumer.assign(list(offsets))
        await consumer.commit({tp: OffsetAndMetadata(o, "") for tp, o in offsets.items()})
    finally:
        await consumer.stop()


def lag_series(text: str, group: str) -> dict[int, float]:
    for family in text_string_to_metric_families(text):
        if family.name == "streamer_group_lag_records":
            return {
                int(s.labels["partition"]): s.value
                for s in family.samples
                if s.labels["group"] == group
            }
    return {}


@pytest.fixture
async def lagging_group(
    kafka_options: dict[str, str], unique_name: str, new_topics
) -> tuple[str, str]:
    (topic,) = await new_topics("in", partitions=len(RECORDS))
    await produce_to_partitions(kafka_options, topic)
    group = f"{unique_name}-group"
    await commit(kafka_options, group, {TopicPartition(topic, p): o for p, o in COMMITTED.items()})
    return group, topic


async def test_once_prints_the_lag_per_partition(
    kafka_bootstrap: str, lagging_group: tuple[str, str]
) -> None:
    group, topic = lagging_group
    common = ("--bootstrap-servers", kafka_bootstrap, "--group", group, "--topic", topic)
    run = await streamer("lag", "--once", "--format", "json", *common)
    assert run.returncode == 0, run.stderr
    rows = [json.loads(line) for line in run.stdout.splitlines()]
    assert {r["partition"]: r["lag"] for r in rows} == EXPECTED_LAG
    assert {r["partition"]: r["committed"] for r in rows} == {**COMMITTED, 2: None}
    assert {r["partition"]: r["end"] for r in rows} == RECORDS

    table = await streamer("lag", "--once", *common)
    assert table.returncode == 0, table.stderr
    lines = [line.split() for line in table.stdout.splitlines()]
    assert lines[0] == ["GROUP", "TOPIC", "PARTITION", "COMMITTED", "END", "LAG"]
    assert lines[-1] == [group, topic, "total", str(sum(EXPECTED_LAG.values()))]


async def test_once_names_a_missing_topic(kafka_bootstrap: str, unique_name: str) -> None:
    run = await streamer(
        "lag", "--once", "--bootstrap-servers", kafka_bootstrap, "--topic", f"{unique_name}-none"
    )
    assert "does not exist" in one_line_error(run, "lag")


async def test_exporter_serves_the_lag_and_follows_new_commits(
    kafka_options: dict[str, str], lagging_group: tuple[str, str]
) -> None:
    group, topic = lagging_group
    exporter = LagExporter(kafka_options, group, [topic], interval_s=0.5, port=0)
    async with exporter:
        url = f"http://127.0.0.1:{exporter.port}"

        async def scraped() -> str | None:
            reply = await request(f"{url}/metrics")
            text = reply.text
            return text if lag_series(text, group) else None

        text = await wait_for(scraped, 30, "the first read on /metrics")
        assert lag_series(text, group) == EXPECTED_LAG
        assert f'streamer_group_lag_up{{group="{group}"}} 1.0' in text
        assert (await request(f"{url}/readyz")).status == 200

        # The group catches up on partition 0: the next reads show it.
        await commit(kafka_options, group, {TopicPartition(topic, 0): RECORDS[0]})

        async def caught_up() -> bool:
            return lag_series((await request(f"{url}/metrics")).text, group).get(0) == 0

        await wait_for(caught_up, 30, "the new commit to show on /metrics")
