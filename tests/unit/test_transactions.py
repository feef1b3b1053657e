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
from streamer.kafka.offsets import OffsetTracker
from streamer.kafka.records import Outcome, prediction, too_large_dead_letter
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


async def writer_for(broker: Broker, tracker: OffsetTracker, fenced: list[Any]) -> PartitionWriter:
    async def read_committed(tp: TopicPartition) -> int | None:
        return broker.committed_offset

    writer = PartitionWriter(
        TP,
        Settings(group_id="g"),
        Metrics(),
        tracker,
        read_committed,
        lambda tid: FakeProducer(broker, tid),  # type: ignore[arg-type,return-value]
        fenced.append,
    )
    await writer.start()
    return writer


def outcome(n: int, dead_letter: bool = False, size: int = 0) -> Outcome:
    value = str(n).encode() + b"x" * size
    return Outcome("out", value, None, [], "corrupt" if dead_letter else None)


async def test_outputs_are_committed_in_offset_order_with_the_offset_past_the_run(
    broker: Broker,
) -> None:
    tracker = OffsetTracker()
    writer = await writer_for(broker, tracker, [])
    tickets = [tracker.start(TP, offset) for offset in (10, 11, 12)]
    late = [asyncio.create_task(writer.deliver(t, outcome(t.offset))) for t in tickets[1:]]
    await asyncio.sleep(0.05)
    assert broker.transactions == [], "nothing may commit while offset 10 is not done"
    await writer.deliver(tickets[0], outcome(10))
    await asyncio.gather(*late)
    assert broker.transactions == [([b"10", b"11", b"12"], {TP: 13})]
    assert writer.transactional_id == "g-in-0"
    await writer.close(1)


async def test_a_failed_commit_is_written_again_with_the_same_outputs(broker: Broker) -> None:
    tracker = OffsetTracker()
    writer = await writer_for(broker, tracker, [])
    broker.fail_next_commit = KafkaConnectionError()
    tickets = [tracker.start(TP, offset) for offset in (0, 1)]
    await asyncio.gather(*(writer.deliver(t, outcome(t.offset)) for t in tickets))
    assert broker.transactions == [([b"0", b"1"], {TP: 2})]  # once, not twice
    assert len(broker.producers) == 2, "the producer is replaced after a failure"
    await writer.close(1)


async def test_a_commit_that_landed_despite_the_error_is_not_written_twice(
    broker: Broker,
) -> None:
    tracker = OffsetTracker()
    writer = await writer_for(broker, tracker, [])
    broker.fail_next_commit = KafkaConnectionError()
    broker.commit_lands_anyway = True
    ticket = tracker.start(TP, 0)
    await writer.deliver(ticket, outcome(0))
    assert broker.transactions == [([b"0"], {TP: 1})]
    assert tracker.committed(TP) == 1
    await writer.close(1)


async def test_a_fenced_writer_abandons_its_records_and_reports_it(broker: Broker) -> None:
    tracker = OffsetTracker()
    fenced: list[PartitionWriter] = []
    writer = await writer_for(broker, tracker, fenced)
    broker.fail_next_commit = ProducerFenced()
    with pytest.raises(DeliveryAbandoned):
        await writer.deliver(tracker.start(TP, 0), outcome(0))
    assert fenced == [writer]
    assert not writer.healthy
    with pytest.raises(DeliveryAbandoned):
        await writer.deliver(tracker.start(TP, 1), outcome(1))
    await writer.close(1)


async def test_a_dead_letter_too_large_for_the_topic_goes_without_its_payload(
    broker: Broker,
) -> None:
    tracker = OffsetTracker()
    writer = await writer_for(broker, tracker, [])
    broker.reject_large_values = 100
    await writer.deliver(tracker.start(TP, 0), outcome(0, dead_letter=True, size=500))
    [(values, offsets)] = broker.transactions
    assert values == [None] and offsets == {TP: 1}
    assert (DLQ_VALUE_DROPPED_BYTES, b"501") in broker.headers[-1]
    await writer.close(1)


async def test_outcomes_of_a_revoked_generation_are_refused(broker: Broker) -> None:
    tracker = OffsetTracker()
    writer = await writer_for(broker, tracker, [])
    stale = tracker.start(TP, 5)
    tracker.forget({TP})  # revoked or rewound meanwhile
    with pytest.raises(DeliveryAbandoned):
        await writer.deliver(stale, outcome(5))
    assert broker.transactions == []
    await writer.close(1)


async def test_records_arriving_while_the_producer_starts_wait_for_it(broker: Broker) -> None:
    # Refusing them would skip them: nothing seeks back after a start.
    tracker = OffsetTracker()
    release = asyncio.Event()

    class SlowStart(FakeProducer):
        async def start(self) -> None:
            await release.wait()
            await super().start()

    writer = PartitionWriter(
        TP,
        Settings(group_id="g"),
        Metrics(),
        tracker,
        lambda tp: asyncio.sleep(0, result=broker.committed_offset),
        lambda tid: SlowStart(broker, tid),  # type: ignore[arg-type,return-value]
        lambda w: None,
    )
    starting = asyncio.create_task(writer.start())
    await asyncio.sleep(0)
    assert writer.healthy, "a starting writer must accept records"
    delivering = asyncio.create_task(writer.deliver(tracker.start(TP, 0), outcome(0)))
    await asyncio.sleep(0.05)
    assert not delivering.done() and broker.transactions == []
    release.set()
    await asyncio.wait_for(asyncio.gather(starting, delivering), 5)
    assert broker.transactions == [([b"0"], {TP: 1})]
    await writer.close(1)


async def test_a_prediction_the_topic_rejects_is_committed_as_its_dead_letter(
    broker: Broker,
) -> None:
    """Finding 2: the same outputs used to be retried forever, stalling the partition."""
    tracker = OffsetTracker()
    writer = await writer_for(broker, tracker, [])
    broker.reject_large_values = 100
    source = ConsumerRecord("in", 0, 0, 0, 0, b"k", b"image", None, 0, 0, ())
    big = prediction(source, "out", b"x" * 500, too_large_dead_letter(source, "dlq"))
    written = await asyncio.wait_for(writer.deliver(tracker.start(TP, 0), big), 5)
    assert written.dead_letter_reason == "output-too-large"
    assert broker.transactions == [([b"image"], {TP: 1})]
    await writer.close(1)
