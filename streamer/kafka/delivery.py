"""How an outcome becomes durable and its input offset committed: the two delivery modes.

Both modes answer the same calls, made by ``Partitions`` (open, close) and the
service (deliver, commit), so neither cares which mode runs:

- ``open(lease, on_fenced)``: before the lease's seek; exactly-once starts the
  partition's transactional producer here, which fences the previous owner;
- ``deliver(ticket, outcome)`` returns the outcome once it is durable (smaller, by
  ``streamer.kafka.records.smaller``, if a topic rejected it as too large), and raises
  ``DeliveryAbandoned`` when it never will be (stopping, partition lost);
- ``commit(leases)`` runs on the commit interval;
- ``close(lease, timeout_s)``: the lease has ended; the last commit or transaction.

``AtLeastOnce`` (the default) sends through one idempotent producer, waits for
the ack, then commits the offset with the consumer; a crash between the two
means the record is processed again (a duplicate, never a loss).
``ExactlyOnce`` (``streamer.kafka.transactions``) puts outputs and offsets in
one Kafka transaction per input partition.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError
from aiokafka.structs import OffsetAndMetadata

from streamer.config import Settings
from streamer.kafka.intake import Intake
from streamer.kafka.partitions import PartitionLease, Ticket
from streamer.kafka.publisher import TOO_LARGE, Publisher
from streamer.kafka.records import Outcome, smaller
from streamer.metrics import Metrics

log = logging.getLogger(__name__)

OnFenced = Callable[[PartitionLease], None]


class Delivery(Protocol):
    async def start(self) -> None: ...

    async def open(self, lease: PartitionLease, on_fenced: OnFenced) -> None: ...

    async def deliver(self, ticket: Ticket, outcome: Outcome) -> Outcome: ...

    async def commit(self, leases: list[PartitionLease]) -> None: ...

    async def close(self, lease: PartitionLease, timeout_s: float | None) -> None: ...

    def abandon(self) -> None:
        """Stop retrying: outputs not yet durable are abandoned (left uncommitted)."""

    async def stop(self) -> None: ...


class AtLeastOnce:
    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        intake: Intake,
        publisher: Publisher | None = None,
    ) -> None:
        self._metrics = metrics
        self._intake = intake
        self._publisher = publisher or Publisher(settings, metrics)

    async def start(self) -> None:
        await self._publisher.start()

    async def open(self, lease: PartitionLease, on_fenced: OnFenced) -> None:
        pass  # one producer for every partition; nothing to fence

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
        ticket.lease.done(ticket)
        return outcome

    async def commit(self, leases: list[PartitionLease]) -> None:
        """Commit, per lease, the lowest offset not yet done (if it moved)."""
        offsets = {lease: o for lease in leases if (o := lease.offsets.committable()) is not None}
        if not offsets:
            return
        try:
            await self._intake.consumer.commit(
                {lease.tp: OffsetAndMetadata(o, "") for lease, o in offsets.items()}
            )
        except (CommitFailedError, IllegalStateError) as exc:
            # A rebalance is in progress; the revocation commits what is done.
            self._metrics.commits.labels("rebalance").inc()
            log.warning("commit skipped during rebalance error=%s", exc)
            return
        except KafkaError as exc:
            self._metrics.commits.labels("error").inc()
            log.warning("commit failed, retried on the next interval error=%r", exc)
            return
        self._metrics.commits.labels("ok").inc()
        for lease, offset in offsets.items():
            lease.offsets.mark_committed(offset)
            self._metrics.committed_offset.labels(lease.tp.topic, str(lease.tp.partition)).set(
                offset
            )

    async def close(self, lease: PartitionLease, timeout_s: float | None) -> None:
        await self.commit([lease])

    def abandon(self) -> None:
        self._publisher.close_for_sends()

    async def stop(self) -> None:
        await self._publisher.stop()
