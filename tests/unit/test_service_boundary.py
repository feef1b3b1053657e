"""Where a record leaves the service (``Service._handle``) and how long shutdown waits for it:
a delivery that fails for the record's sake ends as its dead letter; only a failure that is
not about one record stops the service; ``drain_timeout_s=0`` waits for nothing."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiokafka import ConsumerRecord

from streamer.app import Service, State
from streamer.config import Settings
from streamer.errors import OutputRejected
from streamer.kafka.delivery import AtLeastOnce
from streamer.kafka.partitions import LeaseState, PartitionLease, Partitions, Ticket
from streamer.kafka.records import Outcome
from streamer.metrics import Metrics
from streamer.pipeline.engine import Classified
from streamer.pipeline.processor import ProcessorConfig, RecordProcessor
from streamer.schemas import DLQ_MESSAGE, ModelInfo, header
from tests.unit.test_partitions import FakeConsumer, FakeIntake
from tests.unit.test_transactions import TP

pytestmark = pytest.mark.timeout(30)

SETTINGS = Settings(weights="random:0", device="cpu", max_in_flight=2, max_batch_size=1)


class Engine:
    model_info = ModelInfo(name="resnet18", weights="random:0", device="cpu", precision="fp32")

    def observe_latency(self, seconds: float, fetched_after_s: float = 0.0) -> None:
        pass

    async def classify(self, payload: bytes) -> Classified:
        return Classified([1], [0.9], 1, 0.001, 0.001, 0.01, 0.01)


class Delivery:
    """Refuses what ``refuse`` says, as a Kafka client's own checks would; keeps the rest."""

    def __init__(self, refuse: Any) -> None:
        self.refuse = refuse
        self.written: list[Outcome] = []

    async def deliver(self, ticket: Ticket, outcome: Outcome) -> Outcome:
        error = self.refuse(outcome)
        if error is not None:
            raise error
        self.written.append(outcome)
        ticket.lease.done(ticket)
        return outcome


def service_with(delivery: Delivery) -> tuple[Service, Ticket]:
    service = Service(SETTINGS)
    service._processor = RecordProcessor(
        ProcessorConfig.from_settings(SETTINGS),
        Engine(),  # type: ignore[arg-type]
        service.metrics,
        ["zero", "one"],
    )
    service._delivery = delivery  # type: ignore[assignment]
    lease = PartitionLease(TP, 1)
    lease.state = LeaseState.ACTIVE  # as Partitions does after the seek
    ticket = lease.start(0)
    assert ticket is not None
    return service, ticket


async def handle(service: Service, ticket: Ticket) -> None:
    rec = ConsumerRecord(TP.topic, TP.partition, 0, 1000, 0, b"k", b"img", None, 0, 0, ())
    await service._permits.acquire()
    await service._handle(0, rec, ticket, 0.0, 0.0)


async def test_an_output_the_client_refuses_for_its_own_reasons_becomes_the_records_dead_letter():
    def refuse(outcome: Outcome) -> Exception | None:
        if outcome.dead_letter_reason is None:
            return AssertionError("a check of the Kafka client")
        return None

    delivery = Delivery(refuse)
    service, ticket = service_with(delivery)
    await handle(service, ticket)
    assert service._fatal is None and not service._stop_requested.is_set()
    [written] = delivery.written
    assert written.dead_letter_reason == "internal-error"
    assert header(written.headers, DLQ_MESSAGE) == b"AssertionError: a check of the Kafka client"
    assert ticket.lease.offsets.committable() == 1


async def test_a_dead_letter_the_dead_letter_topic_refuses_stops_the_service() -> None:
    delivery = Delivery(lambda outcome: OutputRejected("max.message.bytes"))
    service, ticket = service_with(delivery)
    await handle(service, ticket)
    assert isinstance(service._fatal, OutputRejected) and service._stop_requested.is_set()


async def test_with_no_drain_time_shutdown_cancels_what_is_in_flight_at_once() -> None:
    service = Service(SETTINGS.model_copy(update={"drain_timeout_s": 0}))
    never = asyncio.create_task(asyncio.Event().wait())
    service._in_flight[0] = never
    service.state = State.RUNNING
    await asyncio.wait_for(service.stop(), 5)
    assert never.cancelled()


async def test_with_no_drain_time_a_revoked_partition_is_let_go_at_once() -> None:
    settings = Settings(group_id="g", drain_timeout_s=0)
    intake: Any = FakeIntake(FakeConsumer(lambda: 0))
    delivery = AtLeastOnce(settings, Metrics(), intake, publisher=object())  # type: ignore[arg-type]
    partitions = Partitions(settings, Metrics(), intake, delivery)
    await partitions.assign({TP})
    lease = partitions.lease(TP)
    assert lease is not None and lease.start(0) is not None  # never done
    await asyncio.wait_for(partitions.revoke({TP}), 5)
    assert partitions.lease(TP) is None
