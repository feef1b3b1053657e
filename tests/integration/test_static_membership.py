"""Static membership: restarting one instance within the session timeout rebalances no one.

Two instances share a group on a 4-partition topic. One of them (not the group
leader: see below) is stopped and started again while records flow. With a
``group_instance_id`` the other instance keeps its partitions, with the same
leases, and counts no rebalance; without one, the stopping member sends
LeaveGroup and the other instance is revoked and reassigned (the contrast run,
which shows the assertion can fail). Either way every input gets an output.

The restarted instance is the one that joined second (a follower). aiokafka
speaks JoinGroup v5, older than KIP-814's "skip assignment" (v9); against Kafka
4.1.1, restarting the first instance (the group leader) caused no rebalance
either, but this test keeps to the case every broker version handles alike.

The timings printed (stop, start, partitions back) are the figures quoted in the
scaling notes; run with ``-s`` to see them.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from aiokafka.structs import TopicPartition

from streamer import corpus
from streamer.app import Service
from streamer.config import Settings
from streamer.tools.produce import Message
from tests.integration.helpers import (
    count_by_id,
    output_ids,
    produce,
    read_all,
    service_settings,
    wait_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

PARTITIONS = 4
WAVE = 12  # records per wave; three waves: before, during and after the restart
SESSION_TIMEOUT_MS = 30_000


def leases(service: Service) -> dict[TopicPartition, int]:
    """The instance's active partitions and the epoch of each lease."""
    assert service._partitions is not None
    return {lease.tp: lease.epoch for lease in service._partitions.active()}


def rebalances(service: Service) -> float:
    value: float = service.metrics.rebalances._value.get()
    return value


def wave(samples: list[corpus.Sample], n: int) -> list[Message]:
    """``WAVE`` images with ids unique to wave ``n`` (the corpus is reused across waves)."""
    chosen = samples[n * WAVE : (n + 1) * WAVE]
    return [
        (f"w{n}-{s.name}".encode(), s.data, [("ce_id", f"w{n}-{s.name}".encode())]) for s in chosen
    ]


async def start(settings: Settings) -> Service:
    service = Service(settings)
    await service.start()
    return service


@pytest.mark.parametrize(
    ("membership", "delivery"),
    [
        ("static", "at-least-once"),
        ("static", "exactly-once"),
        ("dynamic", "at-least-once"),
    ],
)
async def test_restarting_a_static_member_does_not_rebalance_the_other(
    kafka_bootstrap: str,
    kafka_options: dict[str, str],
    unique_name: str,
    new_topics,
    samples: list[corpus.Sample],
    membership: str,
    delivery: str,
) -> None:
    await new_topics("in", "out", "dlq", partitions=PARTITIONS)

    def settings(name: str) -> Settings:
        return service_settings(
            kafka_bootstrap,
            unique_name,
            delivery=delivery,
            group_instance_id=f"{unique_name}-{name}" if membership == "static" else None,
            session_timeout_ms=SESSION_TIMEOUT_MS,
            max_batch_size=8,
            max_in_flight=16,
            inference_threads=1,
            inference_standby=False,
        )

    out_topic = settings("a").output_topic
    in_topic = settings("a").input_topic
    expected: set[str] = set()

    async def send(n: int) -> None:
        messages = wave(samples, n)
        expected.update(key.decode() for key, _, _ in messages if key is not None)
        await produce(kafka_options, in_topic, messages)

    async def all_predicted() -> bool:
        return expected <= await output_ids(kafka_options, out_topic)

    everything = {TopicPartition(in_topic, p) for p in range(PARTITIONS)}
    a = await start(settings("a"))
    b: Service | None = None
    try:
        # a joins alone first: b, the one restarted, joins second (module docstring).
        await wait_for(lambda: set(leases(a)) == everything, 60, "a to own every partition")
        b = await start(settings("b"))

        def split_evenly() -> bool:
            assert b is not None
            mine, theirs = set(leases(a)), set(leases(b))
            return mine | theirs == everything and not mine & theirs and len(mine) == 2

        await wait_for(split_evenly, 90, "the group to split the partitions 2/2")
        await send(0)
        await wait_for(all_predicted, 240, "the first wave's predictions")
        a_before, b_before = leases(a), set(leases(b))
        a_rebalances = rebalances(a)

        await send(1)
        started = time.monotonic()
        await b.stop()
        stopped = time.monotonic()
        await send(2)
        b = await start(settings("b"))
        restarted = time.monotonic()

        def b_is_back() -> bool:
            assert b is not None
            return set(leases(b)) | set(leases(a)) == everything

        await wait_for(b_is_back, 90, "every partition to be owned again")
        back = time.monotonic()
        await send(3)
        await wait_for(all_predicted, 300, "every input predicted")
        print(
            f"membership={membership} delivery={delivery} stop_s={stopped - started:.2f} "
            f"start_s={restarted - stopped:.2f} partitions_back_s={back - stopped:.2f} "
            f"a_rebalances={rebalances(a) - a_rebalances:g} "
            f"b_partitions_before={sorted(tp.partition for tp in b_before)} "
            f"after={sorted(tp.partition for tp in leases(b))}"
        )
        if membership == "static":
            assert rebalances(a) == a_rebalances, "the other instance took part in a rebalance"
            assert leases(a) == a_before, "the other instance's leases changed"
            assert set(leases(b)) == b_before, "the restarted member got other partitions"
        else:
            # LeaveGroup, then the rejoin: a is revoked and reassigned at least once.
            assert rebalances(a) > a_rebalances
            assert leases(a) != a_before
    finally:
        await asyncio.gather(a.stop(), *([b.stop()] if b is not None else []))

    outputs = await read_all(kafka_options, out_topic)
    assert {json.loads(r.value)["id"] for r in outputs} >= expected
    if delivery == "exactly-once":
        assert count_by_id(outputs)[1] == 0, "exactly-once outputs were duplicated"
