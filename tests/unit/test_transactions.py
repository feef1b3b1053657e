"""PartitionWriter logic with a stand-in producer: ordering, retries, recovery, fencing."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiokafka import ConsumerRecord
from aiokafka.errors import KafkaConnectionError, MessageSizeTooLargeError, ProducerFenced
from aiokafka.structs import TopicPartition

from streamer.config import Settings
from streamer.errors import DeliveryAbandoned
from streamer.kafka.partitions import LeaseState, PartitionLease
from streamer.kafka.records import Outcome, prediction
from streamer.kafka.transactions import PartitionWriter
from streamer.metrics import Metrics
from streamer.schemas import DLQ_VALUE_DROPPED_BYTES

pytestmark = pytest.mark.timeout(30)

TP = TopicPartition("in", 0)


class Broker:
    """What the fake producers wrote: committed transactions and the group's offset."""

    def __init__(self) -> None:
        self.committed_offset: int | None = None
        self.transactions: list[tuple[list[bytes | None], dict[TopicPartition, int]]] = []
        self.fail_next_commit: BaseException | None = None
        self.commit_lands_anyway = False  # the failed commit was in fact applied
        self.reject_large_values = 0  # values above this size fail (0: no limit)
        self.producers: list[FakeProducer] = []
        self.headers: list[list[tuple[str, bytes]]] = []


class FakeProducer:
    def __init__(self, broker: Broker, transactional_id: str) -> None:
        self.broker = broker
        self.transactional_id = transactional_id
        self.sent: list[bytes | None] = []
        self.offsets: dict[TopicPartition, int] = {}

    async def start(self) -> None:
        self.broker.producers.append(self)

    async def stop(self) -> None:
        pass

    async def begin_transaction(self) -> None:
        self.sent, self.offsets = [], {}

    async def send(self, topic: str, value: bytes | None, **kwargs: Any) -> asyncio.Future[None]:
        # aiokafka's own check: a transaction holding such a record could never commit.
        assert value is not None or kwargs.get("key") is not None, "Need at least one"
        self.broker.headers.append(kwargs["headers"])
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        limit = self.broker.reject_large_values
        if limit and value is not None and len(value) > limit:
            future.set_exception(MessageSizeTooLargeError())
        else:
            self.sent.append(value)
            future.set_result(None)
        return future

    async def send_offsets_to_transaction(
        self, offsets: dict[TopicPartition, int], group_id: str
    ) -> None:
        self.offsets = dict(offsets)

    async def commit_transaction(self) -> None:
        error, self.broker.fail_next_commit = self.broker.fail_next_commit, None
        if error is None or self.broker.commit_lands_anyway:
            self.broker.transactions.append((self.sent, self.offsets))
            self.broker.committed_offset = self.offsets[TP]
        if error is not None:
            raise error


@pytest.fixture
def broker() -> Broker:
    return Broker()


async def writer_for(broker: Broker, fenced: list[Any]) -> tuple[PartitionWriter, PartitionLease]:
    """A started writer for an active lease, as ``Partitions`` opens one."""

    async def read_committed(tp: TopicPartition) -> int | None:
        return broker.committed_offset

    lease = PartitionLease(TP, 1)
    writer = PartitionWriter(
        lease,
        Settings(group_id="g"),
        Metrics(),
        read_committed,
        lambda tid: FakeProducer(broker, tid),  # type: ignore[arg-type,return-value]
        fenced.append,
    )
    lease.writer = writer
    await writer.start()
    lease.state = LeaseState.ACTIVE
    return writer, lease


def outcome(n: int, dead_letter: bool = False, size: int = 0) -> Outcome:
    value = str(n).encode() + b"x" * size
    return Outcome("out", value, None, [], "corrupt" if dead_letter else None)


async def test_outputs_are_committed_in_offset_order_with_the_offset_past_the_run(
    broker: Broker,
) -> None:
    writer, lease = await writer_for(broker, [])
    tickets = [lease.start(offset) for offset in (10, 11, 12)]
    late = [asyncio.create_task(writer.deliver(t, outcome(t.offset))) for t in tickets[1:]]
    await asyncio.sleep(0.05)
    assert broker.transactions == [], "nothing may commit while offset 10 is not done"
    await writer.deliver(tickets[0], outcome(10))
    await asyncio.gather(*late)
    assert broker.transactions == [([b"10", b"11", b"12"], {TP: 13})]
    assert writer.transactional_id == "g-in-0"
    await writer.close(1)


async def test_a_failed_commit_is_written_again_with_the_same_outputs(broker: Broker) -> None:
    writer, lease = await writer_for(broker, [])
    broker.fail_next_commit = KafkaConnectionError()
    tickets = [lease.start(offset) for offset in (0, 1)]
    await asyncio.gather(*(writer.deliver(t, outcome(t.offset)) for t in tickets))
    assert broker.transactions == [([b"0", b"1"], {TP: 2})]  # once, not twice
    assert len(broker.producers) == 2, "the producer is replaced after a failure"
    await writer.close(1)


async def test_a_commit_that_landed_despite_the_error_is_not_written_twice(
    broker: Broker,
) -> None:
    writer, lease = await writer_for(broker, [])
    broker.fail_next_commit = KafkaConnectionError()
    broker.commit_lands_anyway = True
    ticket = lease.start(0)
    await writer.deliver(ticket, outcome(0))
    assert broker.transactions == [([b"0"], {TP: 1})]
    assert lease.offsets.committed == 1
    await writer.close(1)


async def test_a_fenced_writer_abandons_its_records_and_reports_it(broker: Broker) -> None:
    fenced: list[PartitionLease] = []
    writer, lease = await writer_for(broker, fenced)
    broker.fail_next_commit = ProducerFenced()
    with pytest.raises(DeliveryAbandoned):
        await writer.deliver(lease.start(0), outcome(0))
    assert fenced == [lease]
    with pytest.raises(DeliveryAbandoned):
        await writer.deliver(lease.start(1), outcome(1))
    await writer.close(1)


async def test_a_dead_letter_too_large_for_the_topic_goes_without_its_payload(
    broker: Broker,
) -> None:
    writer, lease = await writer_for(broker, [])
    broker.reject_large_values = 100
    await writer.deliver(lease.start(0), outcome(0, dead_letter=True, size=500))
    [(values, offsets)] = broker.transactions
    # Keyless, so the value is empty rather than null: Kafka clients send no record
    # without both (aiokafka asserts), and a transaction holding one never commits.
    assert values == [b""] and offsets == {TP: 1}
    assert (DLQ_VALUE_DROPPED_BYTES, b"501") in broker.headers[-1]
    await writer.close(1)


async def test_outcomes_of_an_ended_lease_are_refused(broker: Broker) -> None:
    writer, lease = await writer_for(broker, [])
    stale = lease.start(5)
    lease.state = LeaseState.ENDED  # revoked or fenced meanwhile
    with pytest.raises(DeliveryAbandoned):
        await writer.deliver(stale, outcome(5))
    assert broker.transactions == []
    await writer.close(1)


async def test_a_prediction_the_topic_rejects_is_committed_as_its_dead_letter(
    broker: Broker,
) -> None:
    """Finding 2: the same outputs used to be retried forever, stalling the partition."""
    writer, lease = await writer_for(broker, [])
    broker.reject_large_values = 100
    source = ConsumerRecord("in", 0, 0, 0, 0, b"k", b"image", None, 0, 0, ())
    big = prediction(source, "out", b"x" * 500, "dlq")
    written = await asyncio.wait_for(writer.deliver(lease.start(0), big), 5)
    assert written.dead_letter_reason == "output-too-large"
    assert broker.transactions == [([b"image"], {TP: 1})]
    await writer.close(1)
