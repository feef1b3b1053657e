"""How an outcome becomes durable and its input offset committed: the two delivery modes.

Both modes answer the same questions, so the service does not care which runs:

- ``deliver(ticket, outcome)`` returns the outcome once it is durable (smaller, by
  ``streamer.kafka.records.smaller``, if a topic rejected it as too large), and raises
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

from aiokafka.structs import TopicPartition

from streamer.config import Settings
from streamer.kafka.intake import Intake
from streamer.kafka.offsets import OffsetTracker, Ticket
from streamer.kafka.publisher import TOO_LARGE, Publisher
from streamer.kafka.records import Outcome, smaller
from streamer.metrics import Metrics


class Delivery(Protocol):
    async def start(self) -> None: ...

    async def deliver(self, ticket: Ticket, outcome: Outcome) -> Outcome: ...

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

    async def deliver(self, ticket: Ticket, outcome: Outcome) -> Outcome:
        while True:
            try:
                await self._publisher.send(
                    outcome.topic, outcome.value, outcome.key, outcome.headers
                )
                break
            except TOO_LARGE:
                # Rather than drop the record or stop: a smaller form that says so.
                outcome = smaller(outcome)
        self._tracker.done(ticket)
        return outcome

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
