"""Partition leases: the orders of assign, revoke, fence and shutdown (review findings 3-5).

A stand-in consumer and the fake transactional producers of test_transactions; the
real ``Partitions``, ``ExactlyOnce``, ``PartitionWriter`` and ``Service.stop``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from aiokafka.errors import ProducerFenced
from aiokafka.structs import TopicPartition

from streamer.app import Service, State
from streamer.config import Settings
from streamer.errors import DeliveryAbandoned
from streamer.kafka import partitions as partitions_module
from streamer.kafka.delivery import AtLeastOnce
from streamer.kafka.partitions import LeaseState, Partitions
from streamer.kafka.transactions import ExactlyOnce
from streamer.metrics import Metrics
from tests.unit.test_transactions import TP, Broker, FakeProducer, outcome

pytestmark = pytest.mark.timeout(30)

SETTINGS = Settings(group_id="g", drain_timeout_s=5)


class FakeConsumer:
    """What ``Partitions`` asks of aiokafka's consumer; the committed offset is the broker's."""

    def __init__(self, committed: Callable[[], int | None]) -> None:
        self.assigned = {TP}
        self._committed = committed
        self.committed_reads = asyncio.Event()
        self.committed_reads.set()
        self.seeks: list[tuple[TopicPartition, int]] = []
        self.commits: list[dict[TopicPartition, int]] = []

    def assignment(self) -> set[TopicPartition]:
        return set(self.assigned)

    async def committed(self, tp: TopicPartition) -> int | None:
        await self.committed_reads.wait()
        return self._committed()

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.seeks.append((tp, offset))

    async def beginning_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        return dict.fromkeys(tps, 0)

    async def end_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        return dict.fromkeys(tps, 100)

    def highwater(self, tp: TopicPartition) -> int | None:
        return None

    async def commit(self, offsets: dict[TopicPartition, Any]) -> None:
        self.commits.append({tp: meta.offset for tp, meta in offsets.items()})


class FakeIntake:
    def __init__(self, consumer: FakeConsumer) -> None:
        self.consumer = consumer

    def owns(self, tp: TopicPartition) -> bool:
        return tp in self.consumer.assigned

    def position(self, tp: TopicPartition) -> int | None:
        return None


def exactly_once(
    broker: Broker, producer: type[FakeProducer] = FakeProducer
) -> tuple[Partitions, FakeConsumer, ExactlyOnce]:
    consumer = FakeConsumer(lambda: broker.committed_offset)
    intake: Any = FakeIntake(consumer)
    delivery = ExactlyOnce(SETTINGS, Metrics(), intake, lambda tid: producer(broker, tid))  # type: ignore[arg-type,return-value]
    return Partitions(SETTINGS, Metrics(), intake, delivery), consumer, delivery


async def wait_until(condition: Callable[[], Any], what: str, timeout_s: float = 10) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not (value := condition()):
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)
    return value


async def test_records_fetched_while_the_writer_starts_are_dropped_and_fetched_again() -> None:
    """Finding 3: they used to be accepted, delivered and committed before the seek; the
    seek then fetched them again and committed the same offsets twice (duplicates, and
    an offset moving backwards), and the overwritten entries leaked their permits."""
    broker = Broker()
    broker.committed_offset = 5
    release = asyncio.Event()

    class SlowStart(FakeProducer):
        async def start(self) -> None:
            await release.wait()
            await super().start()

    partitions, consumer, delivery = exactly_once(broker, SlowStart)
    assigning = asyncio.create_task(partitions.assign({TP}))
    await asyncio.sleep(0.05)
    assert partitions.lease(TP) is None, "a record fetched now carries no lease: dropped"
    release.set()
    await asyncio.wait_for(assigning, 5)
    assert consumer.seeks == [(TP, 5)]
    lease = partitions.lease(TP)
    assert lease is not None and lease.active
    # The seek fetches offset 5 again; it starts once, under the active lease.
    ticket = lease.start(5)
    assert ticket is not None and lease.start(5) is None
    await asyncio.wait_for(delivery.deliver(ticket, outcome(5)), 5)
    assert broker.transactions == [([b"5"], {TP: 6})]
    await partitions.close(1)


async def test_activation_waits_for_the_committed_offset() -> None:
    broker = Broker()
    broker.committed_offset = 3
    partitions, consumer, _ = exactly_once(broker)
    consumer.committed_reads.clear()  # the broker has not answered yet
    assigning = asyncio.create_task(partitions.assign({TP}))
    await wait_until(lambda: broker.producers, "the writer to start (fencing)")
    assert partitions.lease(TP) is None and consumer.seeks == []
    consumer.committed_reads.set()
    await asyncio.wait_for(assigning, 5)
    assert consumer.seeks == [(TP, 3)] and partitions.lease(TP) is not None
    await partitions.close(1)


async def test_a_fenced_partition_is_taken_back_from_the_committed_offset(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Finding 4: the offsets state used to survive the fence with ``next_commit``
    advanced, so records dropped while fenced left no gap and the retaken writer
    committed past them before the rewind."""
    monkeypatch.setattr(partitions_module, "FENCED_RETAKE_S", 0.05)
    broker = Broker()
    broker.committed_offset = 0
    partitions, consumer, delivery = exactly_once(broker)
    await partitions.assign({TP})
    first = partitions.lease(TP)
    assert first is not None
    tickets = [first.start(offset) for offset in (0, 1, 2)]
    broker.fail_next_commit = ProducerFenced()
    late = asyncio.create_task(delivery.deliver(tickets[2], outcome(2)))
    with pytest.raises(DeliveryAbandoned):
        await asyncio.wait_for(delivery.deliver(tickets[0], outcome(0)), 5)
    assert first.state is LeaseState.ENDED, "deactivated at once"
    with pytest.raises(DeliveryAbandoned):
        await late
    with pytest.raises(DeliveryAbandoned):  # finishing late under the fenced lease
        await delivery.deliver(tickets[1], outcome(1))

    second = await wait_until(lambda: partitions.lease(TP), "the partition to be taken back")
    assert second is not first and second.epoch > first.epoch
    assert consumer.seeks[-1] == (TP, 0), "rewound to the committed offset"
    assert second.offsets.committable() is None, "nothing of the fenced lease's state"
    again = [second.start(offset) for offset in (0, 1, 2)]
    await asyncio.wait_for(
        asyncio.gather(*(delivery.deliver(t, outcome(t.offset)) for t in again)), 5
    )
    assert broker.transactions[-1] == ([b"0", b"1", b"2"], {TP: 3})
    assert [offsets[TP] for _, offsets in broker.transactions] == [3]
    await partitions.close(1)


async def test_a_revoked_partition_drains_then_commits_then_closes_its_writer() -> None:
    broker = Broker()
    broker.committed_offset = 0
    partitions, _, delivery = exactly_once(broker)
    await partitions.assign({TP})
    lease = partitions.lease(TP)
    assert lease is not None
    ticket = lease.start(0)
    assert ticket is not None

    async def finish_later() -> None:
        await asyncio.sleep(0.1)
        await delivery.deliver(ticket, outcome(0))

    finishing = asyncio.create_task(finish_later())
    await partitions.revoke({TP})
    assert broker.transactions == [([b"0"], {TP: 1})], "drained and committed before the end"
    assert lease.state is LeaseState.ENDED and partitions.lease(TP) is None
    await finishing


async def test_at_least_once_commits_what_is_done_when_a_partition_is_revoked() -> None:
    consumer = FakeConsumer(lambda: 7)
    intake: Any = FakeIntake(consumer)
    delivery = AtLeastOnce(SETTINGS, Metrics(), intake, publisher=object())  # type: ignore[arg-type]
    partitions = Partitions(SETTINGS, Metrics(), intake, delivery)
    await partitions.assign({TP})
    lease = partitions.lease(TP)
    assert lease is not None and consumer.seeks == [(TP, 7)]
    for offset in (7, 8):
        ticket = lease.start(offset)
        assert ticket is not None
        lease.done(ticket)
    await partitions.revoke({TP})
    assert consumer.commits == [{TP: 9}]


async def test_shutdown_closes_partitions_before_leaving_the_group() -> None:
    """Finding 5: writers used to close after the consumer had left the group, so the
    last transactions raced the next owner's fence."""
    order: list[str] = []

    class Step:
        def __init__(self, name: str) -> None:
            self.name = name
            self.started = True

        def stop_fetching(self) -> None:
            order.append("stop fetching")

        async def close(self, drain_timeout_s: float | None) -> None:
            order.append("last transactions, writers closed")

        async def stop(self) -> None:
            order.append(self.name)

    service = Service(Settings(weights="random:0", device="cpu", max_in_flight=2, max_batch_size=1))
    service._intake = Step("consumer left the group")  # type: ignore[assignment]
    service._partitions = Step("partitions")  # type: ignore[assignment]
    service._delivery = Step("producer stopped")  # type: ignore[assignment]
    service.state = State.RUNNING
    await service.stop()
    assert order == [
        "stop fetching",
        "last transactions, writers closed",
        "consumer left the group",
        "producer stopped",
    ]


async def test_a_partition_without_progress_is_stalled_and_the_service_not_ready() -> None:
    broker = Broker()
    broker.committed_offset = 0
    consumer = FakeConsumer(lambda: 0)
    intake: Any = FakeIntake(consumer)
    settings = Settings(group_id="g", stall_timeout_s=30)
    metrics = Metrics()
    delivery = ExactlyOnce(settings, metrics, intake, lambda tid: FakeProducer(broker, tid))  # type: ignore[arg-type,return-value]
    partitions = Partitions(settings, metrics, intake, delivery)
    await partitions.assign({TP})
    lease = partitions.lease(TP)
    assert lease is not None and lease.start(0) is not None
    partitions.update_lag()
    assert partitions.stalled() == [] and metrics.partitions_stalled._value.get() == 0
    lease.offsets.progressed_at -= 31  # no commit for longer than stall_timeout_s
    partitions.update_lag()
    assert partitions.stalled() == [lease] and metrics.partitions_stalled._value.get() == 1

    service = Service(Settings(weights="random:0", device="cpu", max_in_flight=2, max_batch_size=1))
    service._ready = True
    service._partitions = partitions
    assert not service.ready, "/readyz must answer 503 while a partition is stalled"
    service._partitions = None
    assert service.ready
    service.engine.slots.close()
    await partitions.close(0)
