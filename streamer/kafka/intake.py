"""The consumer side: fetch records, tag each with its partition's lease, pause for backpressure.

Offsets are committed manually, never automatically. The order that makes
at-least-once hold, for every record:

1. the record is fetched and tagged with its partition's active lease, in the same
   step as the fetch (``records``); a record fetched while no lease is active (an
   assignment still seeking) carries none and is dropped: the seek fetches it again;
2. after an in-flight permit is held, it starts under its lease, if that lease is
   still active;
3. its prediction or dead letter is sent and *acked* by the broker (acks=all);
4. only then is it marked done in the lease's offsets;
5. the delivery commits, per partition, the lowest offset not yet done, so a commit
   never covers a record whose output is not durable.

In exactly-once mode steps 3-5 are one Kafka transaction instead
(``streamer.kafka.transactions``). Assignment, revocation and fencing are
``streamer.kafka.partitions``'s alone; this class owns the consumer.

With ``group_instance_id`` set the consumer is a static member: stopping it sends
no LeaveGroup, so the other members keep their partitions while it restarts, and
its own stay unread until it is back (at most ``session_timeout_ms``; after that the
group rebalances without it). The ordering above is unchanged: the last commits
happen before the consumer stops, whether or not it leaves the group.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener
from aiokafka.errors import IllegalStateError
from aiokafka.structs import TopicPartition

from streamer.config import Settings
from streamer.kafka import compat, wire
from streamer.kafka.clients import connection_options
from streamer.kafka.partitions import PartitionLease, Partitions
from streamer.kafka.records import Record
from streamer.metrics import Metrics

log = logging.getLogger(__name__)


class Intake:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self._settings = settings
        self._metrics = metrics
        self._consumer: AIOKafkaConsumer | None = None
        self._stopping = False

    @property
    def started(self) -> bool:
        return self._consumer is not None

    @property
    def consumer(self) -> AIOKafkaConsumer:
        if self._consumer is None:
            raise RuntimeError("Intake is not started")
        return self._consumer

    async def start(self, listener: ConsumerRebalanceListener) -> None:
        s = self._settings
        # No bytes in a fetch response can make getmany() fail, and none inflates past the cap.
        wire.install(max_batch_decompressed_bytes=s.max_batch_decompressed_bytes)
        self._consumer = AIOKafkaConsumer(
            group_id=s.group_id,
            # Static membership: aiokafka sends no LeaveGroup on stop() when this is set
            # (GroupCoordinator._maybe_leave_group), so the broker keeps our partitions
            # for session_timeout_ms and a quick restart gets them back unrebalanced.
            group_instance_id=s.group_instance_id,
            session_timeout_ms=s.session_timeout_ms,
            heartbeat_interval_ms=min(3000, s.session_timeout_ms // 3),
            enable_auto_commit=False,
            auto_offset_reset=s.auto_offset_reset,
            max_poll_records=min(500, s.max_in_flight),
            max_partition_fetch_bytes=s.max_message_bytes,
            isolation_level="read_committed",
            **connection_options(s),
        )
        self._consumer.subscribe([s.input_topic], listener=listener)
        await self._consumer.start()
        log.info(
            "consumer started topic=%s group=%s instance=%s session_timeout_ms=%d",
            s.input_topic,
            s.group_id,
            s.group_instance_id or "-",
            s.session_timeout_ms,
        )

    async def records(
        self, partitions: Partitions
    ) -> AsyncIterator[tuple[Record, PartitionLease | None]]:
        """Yield ``(record, lease)`` until ``stop_fetching``: the lease active at fetch time."""
        while not self._stopping:
            batches = await self.consumer.getmany(timeout_ms=200)
            leases = {tp: partitions.lease(tp) for tp in batches}  # no await since the fetch
            for tp, records in batches.items():
                self._metrics.records_consumed.labels(tp.topic).inc(len(records))
                for record in records:
                    yield record, leases[tp]

    def group_problem(self) -> str | None:
        """Why the consumer is not a working member of its group now, or None.

        aiokafka has no public API for this, so ``compat.group_state`` reads its
        coordinator (tests/integration/test_broker_restart.py pins what it means). The
        coordinator is forgotten when heartbeats fail for a session timeout, so a lost
        broker shows within ``session_timeout_ms`` plus a heartbeat.
        """
        if self._consumer is None:
            return "the consumer is not started"
        group = self._settings.group_id
        coordinator_known, generation, assigned = compat.group_state(self._consumer)
        if not coordinator_known:
            return (
                f"no coordinator for group {group!r}: the brokers "
                f"({self._settings.bootstrap_servers}) are unreachable or electing one"
            )
        if generation < 0 or not assigned:
            return f"joining group {group!r}"
        return None

    def position(self, tp: TopicPartition) -> int | None:
        """The next offset the consumer fetches from ``tp``, without a request (None while
        unknown). aiokafka's public ``position`` may send one."""
        return None if self._consumer is None else compat.fetch_position(self._consumer, tp)

    def owns(self, tp: TopicPartition) -> bool:
        return self._consumer is not None and tp in self._consumer.assignment()

    def pause(self) -> None:
        partitions = self.consumer.assignment()
        if partitions:
            self.consumer.pause(*partitions)
        self._metrics.paused.set(1)

    def resume(self) -> None:
        partitions = self.consumer.assignment()
        # The assignment may have changed meanwhile; a new one starts unpaused.
        with contextlib.suppress(IllegalStateError):
            self.consumer.resume(*partitions)
        self._metrics.paused.set(0)

    def stop_fetching(self) -> None:
        self._stopping = True
        if self._consumer is not None and self._consumer.assignment():
            self.pause()

    async def stop(self) -> None:
        """Leave the group and close; safe to call twice.

        A static member (``group_instance_id``) does not leave: the group keeps its
        partitions unassigned until it rejoins or ``session_timeout_ms`` passes.
        """
        self._stopping = True
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            await consumer.stop()
            log.info("consumer stopped")
