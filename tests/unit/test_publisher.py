"""Publisher retry logic, with stand-in producers (pure logic: no broker)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiokafka.errors import KafkaTimeoutError, OutOfOrderSequenceNumber

from streamer.config import Settings
from streamer.kafka.publisher import Publisher, PublisherClosed
from streamer.metrics import Metrics


class FakeProducer:
    def __init__(self, failures: list[Exception]) -> None:
        self.failures = failures
        self.sent: list[Any] = []
        self.started = self.stopped = False
        self.attempted = asyncio.Event()

    async def start(self) -> None:
        self.started = True

    async def stop(self) -> None:
        self.stopped = True

    async def send_and_wait(self, topic: str, value: bytes, **kwargs: Any) -> str:
        self.attempted.set()
        if self.failures:
            raise self.failures.pop(0)
        self.sent.append((topic, value))
        return "acked"


async def test_a_producer_stuck_on_sequence_errors_is_replaced_and_the_send_succeeds() -> None:
    stuck = FakeProducer([OutOfOrderSequenceNumber(), OutOfOrderSequenceNumber()])
    healthy = FakeProducer([])
    producers = iter([stuck, healthy])
    metrics = Metrics()
    publisher = Publisher(Settings(), metrics, producer_factory=lambda: next(producers))
    await publisher.start()

    assert await asyncio.wait_for(publisher.send("out", b"v", None, []), 5) == "acked"
    assert stuck.stopped and healthy.started
    assert healthy.sent == [("out", b"v")]
    assert metrics.producer_recreations._value.get() == 1
    await publisher.stop()


async def test_transient_errors_are_retried_with_the_same_producer() -> None:
    producer = FakeProducer([KafkaTimeoutError()])
    metrics = Metrics()
    publisher = Publisher(Settings(), metrics, producer_factory=lambda: producer)
    await publisher.start()
    assert await asyncio.wait_for(publisher.send("out", b"v", None, []), 5) == "acked"
    assert metrics.producer_recreations._value.get() == 0
    assert metrics.produce_errors.labels("out")._value.get() == 1


async def test_closing_stops_the_retries() -> None:
    producer = FakeProducer([KafkaTimeoutError()] * 100)
    publisher = Publisher(Settings(), Metrics(), producer_factory=lambda: producer)
    await publisher.start()
    sending = asyncio.create_task(publisher.send("out", b"v", None, []))
    await asyncio.wait_for(producer.attempted.wait(), 5)  # it is now in its retry backoff
    publisher.close_for_sends()
    with pytest.raises(PublisherClosed):
        await asyncio.wait_for(sending, 5)
