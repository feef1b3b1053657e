"""The consumer side: fetch records, pause for backpressure, commit, follow rebalances.

Offsets are committed manually, never automatically. The order that makes
at-least-once hold, for every record:

1. the record is fetched and started in the ``OffsetTracker`` (after an in-flight
   permit is held);
2. its prediction or dead letter is sent and *acked* by the broker (acks=all);
3. only then is it marked done in the tracker;
4. the commit loop commits, per partition, the lowest offset not yet done, so a
   commit never covers a record whose output is not durable;
5. on revocation, in-flight work of the revoked partitions gets a deadline to
   finish, done offsets are committed, and the partitions are forgotten: late
   acks for them change nothing, so we never commit for a partition we lost.

In exactly-once mode steps 2-4 are one Kafka transaction instead
(``streamer.kafka.transactions``) and this class commits nothing itself.

Every (re)assignment seeks to the group's committed offset and starts a new
*generation* of the partition: records fetched before it (still in a local
batch, or waiting for a permit) are stale and are dropped by the caller, since
the consumer fetches them again from the committed offset.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, ConsumerRecord
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError
from aiokafka.structs import OffsetAndMetadata, TopicPartition

from streamer.config import Settings
from streamer.kafka import wire
from streamer.kafka.clients import connection_options
from streamer.kafka.offsets import OffsetTracker
from streamer.kafka.publisher import backoff_s
from streamer.metrics import Metrics

log = logging.getLogger(__name__)

PartitionsHook = Callable[[set[TopicPartition]], Awaitable[None]]


class Intake:
    def __init__(
        self,
        settings: Settings,
        tracker: OffsetTracker,
        metrics: Metrics,
        on_assign: PartitionsHook,
        on_revoke: PartitionsHook,
    ) -> None:
        self._settings = settings
        self._tracker = tracker
        self._metrics = metrics
        self._on_assign = on_assign
        self._on_revoke = on_revoke
        self._consumer: AIOKafkaConsumer | None = None
        self._stopping = False
        self._generations: dict[TopicPartition, int] = {}

    @property
    def started(self) -> bool:
        return self._consumer is not None

    @property
    def consumer(self) -> AIOKafkaConsumer:
        if self._consumer is None:
            raise RuntimeError("Intake is not started")
        return self._consumer

    async def start(self) -> None:
        s = self._settings
        wire.install()  # no bytes in a record can make getmany() fail
        self._consumer = AIOKafkaConsumer(
            group_id=s.group_id,
            enable_auto_commit=False,
            auto_offset_reset=s.auto_offset_reset,
            max_poll_records=min(500, s.max_in_flight),
            max_partition_fetch_bytes=max(1024 * 1024, s.max_payload_bytes + 65536),
            isolation_level="read_committed",
            **connection_options(s),
        )
        self._consumer.subscribe([s.input_topic], listener=_Listener(self))
        await self._consumer.start()
        log.info("consumer started topic=%s group=%s", s.input_topic, s.group_id)

    async def records(self) -> AsyncIterator[tuple[ConsumerRecord[bytes, bytes], int]]:
        """Yield ``(record, generation)`` until ``stop_fetching``; see ``is_current``."""
        while not self._stopping:
            batches = await self.consumer.getmany(timeout_ms=200)
            fetched = {tp: self._generations.get(tp, 0) for tp in batches}
            for tp, records in batches.items():
                self._metrics.records_consumed.labels(tp.topic).inc(len(records))
                for record in records:
                    yield record, fetched[tp]

    def is_current(self, tp: TopicPartition, generation: int) -> bool:
        """Whether a record fetched in ``generation`` may still be processed."""
        return generation == self._generations.get(tp, 0) and tp in self.consumer.assignment()

    def owns(self, tp: TopicPartition) -> bool:
        return tp in self.consumer.assignment()

    async def rewind(self, tp: TopicPartition) -> None:
        """Drop the partition's progress and fetch again from the committed offset."""
        await self._seek_until_done(tp, rewind=True)

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

    async def commit(self, only: set[TopicPartition] | None = None) -> None:
        """Commit what the tracker allows for the partitions we own (or ``only`` those)."""
        owned = set(self.consumer.assignment())
        offsets = self._tracker.committable(owned if only is None else owned & only)
        if not offsets:
            return
        try:
            await self.consumer.commit({tp: OffsetAndMetadata(o, "") for tp, o in offsets.items()})
        except (CommitFailedError, IllegalStateError) as exc:
            # A rebalance is in progress; the revocation hook commits what is done.
            self._metrics.commits.labels("rebalance").inc()
            log.warning("commit skipped during rebalance error=%s", exc)
            return
        except KafkaError as exc:
            self._metrics.commits.labels("error").inc()
            log.warning("commit failed, retried on the next interval error=%r", exc)
            return
        self._tracker.mark_committed(offsets)
        self._metrics.commits.labels("ok").inc()
        for tp, offset in offsets.items():
            self._metrics.committed_offset.labels(tp.topic, str(tp.partition)).set(offset)
            log.debug("committed topic=%s partition=%d offset=%d", tp.topic, tp.partition, offset)

    def update_lag(self) -> None:
        consumer = self.consumer
        for tp in consumer.assignment():
            highwater = consumer.highwater(tp)
            committed = self._tracker.committed(tp)
            if highwater is not None and committed is not None:
                self._metrics.consumer_lag.labels(tp.topic, str(tp.partition)).set(
                    max(0, highwater - committed)
                )

    async def stop(self) -> None:
        """Leave the group and close; safe to call twice."""
        self._stopping = True
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            await consumer.stop()
            log.info("consumer stopped")

    async def _assigned(self, assigned: set[TopicPartition]) -> None:
        # The hook first: in exactly-once mode it fences the previous owner, which
        # settles that owner's open transaction, offsets included.
        await self._on_assign(assigned)
        for tp in assigned:
            await self._seek_until_done(tp)
        self.update_lag()  # seeded from the committed offsets: a stall shows from the start

    async def _seek_until_done(self, tp: TopicPartition, rewind: bool = False) -> None:
        """Seek to the committed offset, retrying while the broker cannot say what it is.

        Not optional: records of ``tp`` fetched before the seek may have been dropped
        (stale generation, or no transactional producer ready yet), and only the seek
        fetches them again. Giving up would let later offsets commit past them.
        """
        for attempt in itertools.count():
            try:
                await self._seek_to_committed(tp, rewind)
                return
            except KafkaError as exc:
                if self._stopping or tp not in self.consumer.assignment():
                    return  # revoked meanwhile: the next owner seeks
                delay = backoff_s(attempt)
                log.warning(
                    "could not read committed offset partition=%s retry_in_s=%.1f error=%r",
                    tp,
                    delay,
                    exc,
                )
                await asyncio.sleep(delay)

    async def _seek_to_committed(self, tp: TopicPartition, rewind: bool = False) -> None:
        """Start a new generation of ``tp`` at the group's committed offset.

        Everything after the last ``await`` is synchronous, so no record can start
        in between: records started before are stale (their tickets no longer
        count), and records fetched before are dropped by the generation check.
        With nothing committed, a new assignment keeps the position the consumer
        reset to (``auto_offset_reset``); a rewind seeks there explicitly.
        """
        committed = await self.consumer.committed(tp)
        position = committed
        if committed is None:
            if not rewind:
                return
            ends = self.consumer.beginning_offsets
            if self._settings.auto_offset_reset == "latest":
                ends = self.consumer.end_offsets
            position = (await ends([tp]))[tp]
        self._tracker.forget({tp})
        if committed is not None:
            self._tracker.seed_committed(tp, committed)
        with contextlib.suppress(IllegalStateError):  # revoked meanwhile
            self.consumer.seek(tp, position)
        self._generations[tp] = self._generations.get(tp, 0) + 1
        log.debug("seek partition=%s offset=%s committed=%s", tp, position, committed)

    async def _revoked(self, revoked: set[TopicPartition]) -> None:
        if not revoked:
            return
        log.info("partitions revoked %s", sorted((tp.topic, tp.partition) for tp in revoked))
        await self._on_revoke(revoked)  # finishes in-flight work and commits what is done
        for tp in revoked:
            self._generations[tp] = self._generations.get(tp, 0) + 1
        self._tracker.forget(revoked)
        for tp in revoked:
            for gauge in (self._metrics.consumer_lag, self._metrics.committed_offset):
                with contextlib.suppress(KeyError):
                    gauge.remove(tp.topic, str(tp.partition))


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, intake: Intake) -> None:
        self._intake = intake

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._intake._revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        log.info("partitions assigned %s", sorted((tp.topic, tp.partition) for tp in assigned))
        await self._intake._assigned(set(assigned))
