"""Partition ownership: one lease per assigned input partition, and one owner of leases.

aiokafka makes a new ``Assignment`` at every rebalance and every fetch result carries
the one it came from. Partitions work the same way here: each time this instance
takes an input partition (an assignment, or taking it back after a fence) it makes a
new ``PartitionLease``, never reused. The lease owns everything about that stretch of
ownership: its epoch, its offsets (``PartitionOffsets``), its transactional writer in
exactly-once mode, and its state. A record carries the lease that was active when it
was fetched, so "is this record still ours?" is one question, ``lease.active``: a
record of an inactive lease never starts, and its outcome changes nothing.

``Partitions`` is the only code that makes, activates or ends leases, always in these
orders:

Assign (the rebalance listener, or a retake after a fence)
  1. make the lease (starting: records fetched now carry no active lease and are
     dropped; the seek in step 3 fetches them again);
  2. open the delivery for it: in exactly-once mode, start the transactional producer,
     which fences the previous owner and settles its open transaction;
  3. read the group's committed offset and seek there; with nothing committed, seek
     to the beginning or the end as ``auto_offset_reset`` says. Retried until it
     works, or until the partition is no longer assigned here;
  4. activate, in the same step as the seek (no ``await`` in between), so every
     record fetched from then on comes from the new position.

Revoke, and shutdown
  1. the consumer stops fetching the partition (at shutdown, ``Intake`` pauses all);
  2. drain: wait up to ``drain_timeout_s`` for every started record to be done;
  3. deactivate: outcomes that arrive later change nothing;
  4. the last commit (at-least-once) or last transaction (exactly-once), and the
     writer is closed;
  5. only then does the consumer leave the group (``Service.stop``), so the next
     owner's fence never races our last transaction.

Fence (exactly-once: another producer took the partition's transactional id)
  1. deactivate at once and forget the lease: its offsets can never commit;
  2. close its writer, abandoning the records it held (they were not committed);
  3. after ``FENCED_RETAKE_S``, if the group still assigns the partition here, assign
     it again: a new lease and writer, and a seek back to the committed offset before
     anything is delivered.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiokafka import ConsumerRebalanceListener
from aiokafka.errors import IllegalStateError, KafkaError
from aiokafka.structs import TopicPartition

from streamer.config import Settings
from streamer.kafka.offsets import PartitionOffsets
from streamer.kafka.publisher import backoff_s
from streamer.metrics import Metrics

if TYPE_CHECKING:
    from streamer.kafka.delivery import Delivery
    from streamer.kafka.intake import Intake

log = logging.getLogger(__name__)

FENCED_RETAKE_S = 10.0  # a fenced partition is taken back after this, if still ours


class LeaseState(enum.Enum):
    STARTING = "starting"  # steps 1-3 of an assignment
    ACTIVE = "active"
    ENDED = "ended"  # revoked, fenced or shut down: never active again


class PartitionLease:
    """One assignment of one input partition to this instance (see the module docstring)."""

    def __init__(self, tp: TopicPartition, epoch: int) -> None:
        self.tp = tp
        self.epoch = epoch
        self.state = LeaseState.STARTING
        self.offsets = PartitionOffsets()
        self.writer: Any = None  # exactly-once: the PartitionWriter the delivery opened
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def active(self) -> bool:
        return self.state is LeaseState.ACTIVE

    def start(self, offset: int) -> Ticket | None:
        """Start a fetched record; None if it may not start (inactive, or seen already)."""
        if not self.active or not self.offsets.start(offset):
            return None
        self._idle.clear()
        return Ticket(self, offset)

    def done(self, ticket: Ticket) -> None:
        """The record's outcome is durable (or ready for its transaction)."""
        if ticket.lease is not self or not self.active:
            return  # revoked, fenced or shut down meanwhile: changes nothing
        self.offsets.done(ticket.offset)
        if not self.offsets.pending:
            self._idle.set()

    async def drain(self, timeout_s: float | None) -> bool:
        """Wait until every started record is done; False if the deadline passed first."""
        if self._idle.is_set():
            return True  # (wait_for with a 0 s deadline would not even look)
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    def __repr__(self) -> str:
        return f"<lease {self.tp.topic}-{self.tp.partition} epoch={self.epoch} {self.state.value}>"


@dataclass(frozen=True)
class Ticket:
    """Proof that a record was started under a lease; finish it with ``lease.done``."""

    lease: PartitionLease
    offset: int


class Partitions:
    """The leases of this instance: made, activated and ended here only."""

    def __init__(
        self, settings: Settings, metrics: Metrics, intake: Intake, delivery: Delivery
    ) -> None:
        self._settings = settings
        self._metrics = metrics
        self._intake = intake  # its consumer seeks, reads committed offsets, knows assignment
        self._delivery = delivery
        self._leases: dict[TopicPartition, PartitionLease] = {}
        self._epochs = itertools.count(1)
        self._retakes: set[asyncio.Task[None]] = set()
        self._closed = False

    # ------------------------------------------------------------ questions

    def lease(self, tp: TopicPartition) -> PartitionLease | None:
        """The partition's active lease, or None: records fetched now are dropped."""
        lease = self._leases.get(tp)
        return lease if lease is not None and lease.active else None

    def active(self) -> list[PartitionLease]:
        return [lease for lease in self._leases.values() if lease.active]

    def stalled(self) -> list[PartitionLease]:
        """Active leases with records pending or lag, and no progress for ``stall_timeout_s``."""
        now = time.monotonic()
        limit = self._settings.stall_timeout_s
        return [lease for lease in self.active() if lease.offsets.stalled_for(now) > limit]

    # ------------------------------------------------------------ the orders

    async def assign(self, partitions: Iterable[TopicPartition]) -> None:
        self._metrics.rebalances.inc()  # aiokafka calls this once per completed rebalance
        await asyncio.gather(*(self._take(tp) for tp in partitions))

    async def revoke(self, partitions: Iterable[TopicPartition]) -> None:
        leases = [lease for tp in partitions if (lease := self._leases.pop(tp, None))]
        timeout_s = self._settings.drain_timeout_s  # 0: no wait (None would be no bound)
        await asyncio.gather(*(self._end(lease, timeout_s) for lease in leases))
        for lease in leases:
            self._metrics.forget_partition(lease.tp.topic, lease.tp.partition)

    async def close(self, drain_timeout_s: float | None) -> None:
        """Shutdown: end every lease (last commits included); safe to call twice.

        ``drain_timeout_s`` bounds the wait for records still pending (None: no bound).
        """
        self._closed = True
        for task in list(self._retakes):
            task.cancel()
        await asyncio.gather(*self._retakes, return_exceptions=True)
        leases, self._leases = list(self._leases.values()), {}
        await asyncio.gather(*(self._end(lease, drain_timeout_s) for lease in leases))

    def fence(self, lease: PartitionLease) -> None:
        """Exactly-once: another producer owns the partition now (module docstring)."""
        if lease.state is LeaseState.ENDED:
            return
        lease.state = LeaseState.ENDED
        if self._leases.get(lease.tp) is lease:
            del self._leases[lease.tp]
        log.warning("fenced partition=%s epoch=%d", lease.tp, lease.epoch)
        if not self._closed:
            task = asyncio.create_task(self._retake(lease), name=f"retake-{lease.tp}")
            self._retakes.add(task)
            task.add_done_callback(self._retakes.discard)

    # ------------------------------------------------------------ steps

    async def _take(self, tp: TopicPartition) -> None:
        if self._closed:
            return  # shutting down: the group hears from us once we leave
        lease = PartitionLease(tp, next(self._epochs))
        self._leases[tp] = lease
        await self._delivery.open(lease, self.fence)
        await self._seek_and_activate(lease)
        if lease.active:
            log.info("partition active %r committed=%s", lease, lease.offsets.committed)
            self.update_lag([lease])  # seeded from the committed offset: a stall shows at once

    async def _end(self, lease: PartitionLease, drain_timeout_s: float | None) -> None:
        if lease.active and not await lease.drain(drain_timeout_s):
            log.warning(
                "drain deadline passed partition=%s pending=%d (left uncommitted)",
                lease.tp,
                lease.offsets.pending,
            )
        lease.state = LeaseState.ENDED
        await self._delivery.close(lease, drain_timeout_s)
        log.info("partition released %r committed=%s", lease, lease.offsets.committed)

    async def _retake(self, fenced: PartitionLease) -> None:
        await self._delivery.close(fenced, 0)
        await asyncio.sleep(FENCED_RETAKE_S)
        if self._closed or fenced.tp in self._leases or not self._assigned(fenced.tp):
            return
        log.warning("taking back fenced partition %s", fenced.tp)
        await self._take(fenced.tp)

    async def _seek_and_activate(self, lease: PartitionLease) -> None:
        """Steps 3 and 4 of an assignment, retried while the broker cannot answer."""
        for attempt in itertools.count():
            if lease.state is not LeaseState.STARTING or not self._assigned(lease.tp):
                return  # revoked or shut down meanwhile: the next owner seeks
            try:
                position = await self._start_position(lease)
            except KafkaError as exc:
                delay = backoff_s(attempt)
                log.warning(
                    "could not read committed offset partition=%s retry_in_s=%.1f error=%r",
                    lease.tp,
                    delay,
                    exc,
                )
                await asyncio.sleep(delay)
                continue
            if lease.state is not LeaseState.STARTING or self._leases.get(lease.tp) is not lease:
                return
            try:
                self._intake.consumer.seek(lease.tp, position)
            except IllegalStateError:
                return  # no longer assigned
            lease.state = LeaseState.ACTIVE  # no await since the seek: see step 4
            return

    async def _start_position(self, lease: PartitionLease) -> int:
        tp = lease.tp
        consumer = self._intake.consumer
        committed: int | None = await consumer.committed(tp)
        if committed is not None:
            lease.offsets.committed = committed
            return committed
        if self._settings.auto_offset_reset == "latest":
            ends = await consumer.end_offsets([tp])
        else:
            ends = await consumer.beginning_offsets([tp])
        return int(ends[tp])

    def _assigned(self, tp: TopicPartition) -> bool:
        return self._intake.owns(tp)

    def update_lag(self, leases: list[PartitionLease] | None = None) -> None:
        """Lag = high watermark - committed offset, per active partition."""
        for lease in self.active() if leases is None else leases:
            consumer = self._intake.consumer
            lease.offsets.observe(consumer.highwater(lease.tp), self._intake.position(lease.tp))
            if lease.offsets.highwater is not None and lease.offsets.committed is not None:
                self._metrics.consumer_lag.labels(lease.tp.topic, str(lease.tp.partition)).set(
                    lease.offsets.lag
                )
        self._metrics.partitions_stalled.set(len(self.stalled()))


class RebalanceListener(ConsumerRebalanceListener):  # type: ignore[misc]
    """Hands aiokafka's rebalance callbacks to ``Partitions``."""

    def __init__(self, partitions: Partitions) -> None:
        self._partitions = partitions

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        if revoked:
            log.info("partitions revoked %s", sorted((tp.topic, tp.partition) for tp in revoked))
            await self._partitions.revoke(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        log.info("partitions assigned %s", sorted((tp.topic, tp.partition) for tp in assigned))
        await self._partitions.assign(assigned)
