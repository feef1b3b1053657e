"""How an outcome becomes durable and its input offset committed: the two delivery modes.

Both modes answer the same questions, so the service does not care which runs:

- ``deliver(ticket, outcome)`` returns once the outcome is durable, and raises
  ``DeliveryAbandoned`` when it never will be (stopping, partition lost);
- ``assigned`` / ``revoked`` follow the consumer group;
- ``accepts(tp)`` says whether new records of a partition may start;
- ``commit`` runs on the commit interval and once more at shutdown.

``AtLeastOnce`` (the default) sends through one idempotent producer, waits for
the ack, then lets the consumer commit the offset; a crash between the two
means the record is processed again (a duplicate, never a loss).
``ExactlyOnce`` (``streamer.kafka.transactions``) puts outputs and offsets in
one Kafka transaction per input partition.
"""

from __future__ import annotations

from typing import Protocol

from aiokafka.errors import MessageSizeTooLargeError
from aiokafka.structs import TopicPartition

from streamer.config import Settings
from streamer.kafka.intake import Intake
from streamer.kafka.offsets import OffsetTracker, Ticket
from streamer.kafka.publisher import Publisher
from streamer.metrics import Metrics
from streamer.pipeline.processor import Outcome


class Delivery(Protocol):
    async def start(self) -> None: ...

    async def deliver(self, ticket: Ticket, outcome: Outcome) -> None: ...

    def accepts(self, tp: TopicPartition) -> bool: ...

    async def assigned(self, partitions: set[TopicPartition]) -> None: ...

    async def revoked(self, partitions: set[TopicPartition]) -> None: ...

    async def commit(self) -> None: ...

    def abandon(self) -> None:
        """Stop retrying: outputs not yet durable are abandoned (left uncommitted)."""

    async def stop(self) -> None: ...


class AtLeastOnce:
    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        tracker: OffsetTracker,
        intake: Intake,
        publisher: Publisher | None = None,
    ) -> None:
        self._tracker = tracker
        self._intake = intake
        self._publisher = publisher or Publisher(settings, metrics)

    async def start(self) -> None:
        await self._publisher.start()

    async def deliver(self, ticket: Ticket, outcome: Outcome) -> None:
        try:
            await self._send(outcome)
        except MessageSizeTooLargeError:
            if outcome.dead_letter_reason is None:
                raise
            # The dead-letter topic cannot hold the payload: keep everything but the
            # value, and say so, rather than drop the record or stall the partition.
            await self._send(outcome.without_value())
        self._tracker.done(ticket)

    async def _send(self, outcome: Outcome) -> None:
        await self._publisher.send(outcome.topic, outcome.value, outcome.key, outcome.headers)

    def accepts(self, tp: TopicPartition) -> bool:
        return True

    async def assigned(self, partitions: set[TopicPartition]) -> None:
        pass  # the consumer seeks to the committed offsets itself

    async def revoked(self, partitions: set[TopicPartition]) -> None:
        await self._intake.commit(only=partitions)

    async def commit(self) -> None:
        await self._intake.commit()

    def abandon(self) -> None:
        self._publisher.close_for_sends()

    async def stop(self) -> None:
        await self._publisher.stop()
