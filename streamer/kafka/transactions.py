"""Exactly-once delivery: outputs and input offsets committed in one Kafka transaction.

One transactional producer per owned input partition, with the transactional id
``<prefix>-<topic>-<partition>``. aiokafka's ``send_offsets_to_transaction``
takes a group id only (not the consumer-group metadata newer clients fence
with), so fencing comes from the transactional id: the next owner of a
partition starts a producer with the same id, which fences the old owner and
settles its open transaction before the new owner reads the committed offset.

Per partition, a ``PartitionWriter`` collects finished outcomes and, whenever
some are ready, writes one transaction: the outcomes of the contiguous run of
records above the last committed offset, in offset order, then the offset just
past that run. A committed transaction therefore never holds an output for a
record at or above the offset it commits, and a crash reprocesses only records
whose outputs were aborted with their transaction: ``read_committed``
consumers see every output exactly once.

A failed transaction is written again with the same outcomes, which stay in
memory until committed. The producer is replaced first: a new producer with the
same id aborts the open transaction (or completes it, if its commit had already
been accepted), and the group's committed offset then says which of the two
happened. A record's task waits until its transaction commits, holding its
in-flight permit, so ``max_in_flight`` bounds the outcomes held in memory.

Each writer belongs to one ``PartitionLease`` (``streamer.kafka.partitions``) and
uses the lease's offsets; it is opened before the lease's seek and closed when the
lease ends. A fenced writer (another producer took the id) stops, abandons its
records and tells ``Partitions``, which ends the lease and, if the group still
assigns the partition here after a grace period, takes it back with a new lease
and a new writer, from the committed offset.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError, ProducerFenced
from aiokafka.structs import RecordMetadata, TopicPartition

from streamer.config import Settings
from streamer.errors import DeliveryAbandoned, OutputRejected
from streamer.kafka.clients import connection_options
from streamer.kafka.delivery import OnFenced
from streamer.kafka.intake import Intake
from streamer.kafka.partitions import PartitionLease, Ticket
from streamer.kafka.publisher import PRODUCER_BATCH_BYTES, TOO_LARGE, backoff_s
from streamer.kafka.records import Outcome, smaller
from streamer.metrics import Metrics

log = logging.getLogger(__name__)

ProducerFactory = Callable[[str], AIOKafkaProducer]
ReadCommitted = Callable[[TopicPartition], Awaitable[int | None]]

PRODUCER_STOP_TIMEOUT_S = 5.0


class _Fenced(Exception):
    """Another producer owns this partition's transactional id."""


@dataclass
class _Entry:
    outcome: Outcome
    committed: asyncio.Future[Outcome]  # the outcome as written


def transactional_producer(settings: Settings, transactional_id: str) -> AIOKafkaProducer:
    return AIOKafkaProducer(
        transactional_id=transactional_id,
        transaction_timeout_ms=settings.transaction_timeout_ms,
        enable_idempotence=True,
        acks="all",
        max_batch_size=PRODUCER_BATCH_BYTES,
        # Dead letters carry the original payload, which may be large.
        max_request_size=settings.max_message_bytes,
        **connection_options(settings),
    )


class PartitionWriter:
    """The transactions of one lease of one input partition (see the module docstring)."""

    def __init__(
        self,
        lease: PartitionLease,
        settings: Settings,
        metrics: Metrics,
        read_committed: ReadCommitted,
        producer_factory: ProducerFactory,
        on_fenced: OnFenced,
    ) -> None:
        self.tp = lease.tp
        self.transactional_id = settings.transactional_id(lease.tp.topic, lease.tp.partition)
        self._lease = lease
        self._group_id = settings.group_id
        self._metrics = metrics
        self._read_committed = read_committed
        self._new_producer = producer_factory
        self._producer: AIOKafkaProducer | None = None
        self._ready: dict[int, _Entry] = {}
        self._wakeup = asyncio.Event()
        self._closed = False
        self._task: asyncio.Task[None] | None = None
        self._on_fenced = on_fenced

    async def start(self) -> None:
        """Start the producer (fencing any previous owner), then the writing loop.

        Retried until it works or the writer is closed (the lease ended meanwhile).
        """
        attempt = 0
        while self._producer is None and not self._closed:
            try:
                await self._replace_producer()
            except KafkaError as exc:
                delay = backoff_s(attempt)
                attempt += 1
                log.warning(
                    "transactional producer start failed id=%s error=%r retry_in_s=%.1f",
                    self.transactional_id,
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)
        if self._closed:
            await self._stop_producer()
            return
        self._task = asyncio.create_task(self._run(), name=f"transactions-{self.transactional_id}")
        self._task.add_done_callback(self._on_task_done)
        log.info("transactional producer started id=%s", self.transactional_id)

    async def deliver(self, ticket: Ticket, outcome: Outcome) -> Outcome:
        """Queue the outcome; return it (as written) once its transaction has committed."""
        running = self._task is not None and not self._task.done()
        if self._closed or not running or ticket.lease is not self._lease or not self._lease.active:
            raise DeliveryAbandoned(f"{self.tp} offset {ticket.offset}: partition not ours")
        entry = _Entry(outcome, asyncio.get_running_loop().create_future())
        self._ready[ticket.offset] = entry  # one start per offset per lease: never overwritten
        self._lease.done(ticket)
        self._wakeup.set()
        return await asyncio.shield(entry.committed)

    async def close(self, timeout_s: float | None) -> None:
        """Commit what is ready (within ``timeout_s``; None: no bound), abandon the rest,
        stop the producer."""
        self._closed = True
        self._wakeup.set()
        if self._task is not None:
            _, pending = await asyncio.wait([self._task], timeout=timeout_s)
            for task in pending:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._abandon_all()
        await self._stop_producer()

    def _on_task_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error(
                "transaction loop failed id=%s", self.transactional_id, exc_info=task.exception()
            )

    # ------------------------------------------------------------ the loop

    async def _run(self) -> None:
        try:
            while True:
                await self._wakeup.wait()
                self._wakeup.clear()
                target = self._lease.offsets.committable()
                if target is not None:
                    await self._write_run(target)
                if self._closed:
                    return
        except _Fenced:
            self._metrics.transactions.labels("fenced").inc()
            log.warning("fenced: another producer owns id=%s", self.transactional_id)
            self._on_fenced(self._lease)
        except OutputRejected as exc:
            self._abandon_all(exc)  # the waiting records stop the service
            raise
        finally:
            self._abandon_all()

    async def _write_run(self, target: int) -> None:
        """Commit every ready outcome below ``target``, with ``target`` as the offset."""
        offsets = sorted(o for o in self._ready if o < target)
        attempt = 0
        started = time.perf_counter()
        while True:
            try:
                await self._transaction(offsets, target)
                break
            except ProducerFenced as exc:
                raise _Fenced from exc
            except OutputRejected:
                raise
            except Exception as exc:  # any failure: replace the producer, then find out
                self._metrics.transactions.labels("retried").inc()
                delay = backoff_s(attempt)
                attempt += 1
                log.warning(
                    "transaction failed id=%s records=%d attempt=%d retry_in_s=%.1f error=%r",
                    self.transactional_id,
                    len(offsets),
                    attempt,
                    delay,
                    exc,
                )
                if self._closed:
                    return  # abandoned: the next owner settles it
                await asyncio.sleep(delay)
                if await self._recover(target):
                    break  # the failed attempt had committed after all
        self._metrics.transactions.labels("committed").inc()
        self._metrics.transaction_seconds.observe(time.perf_counter() - started)
        self._lease.offsets.mark_committed(target)
        self._metrics.committed_offset.labels(self.tp.topic, str(self.tp.partition)).set(target)
        for offset in offsets:
            entry = self._ready.pop(offset)
            if not entry.committed.done():
                entry.committed.set_result(entry.outcome)

    async def _transaction(self, offsets: list[int], target: int) -> None:
        producer = self._producer
        assert producer is not None
        await producer.begin_transaction()
        sends = [await self._send(producer, self._ready[o]) for o in offsets]
        results = await asyncio.gather(*sends, return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        for offset, result in zip(offsets, results, strict=True):
            if isinstance(result, TOO_LARGE):
                entry = self._ready[offset]  # the retry sends a smaller form
                entry.outcome = smaller(entry.outcome)
        if errors:
            raise errors[0]
        await producer.send_offsets_to_transaction({self.tp: target}, self._group_id)
        await producer.commit_transaction()

    async def _send(
        self, producer: AIOKafkaProducer, entry: _Entry
    ) -> asyncio.Future[RecordMetadata]:
        """Append one outcome to the open transaction; the future resolves on the ack."""
        while True:
            o = entry.outcome
            try:
                return await producer.send(o.topic, o.value, key=o.key, headers=o.headers)
            except TOO_LARGE:  # refused before sending (max_request_size)
                entry.outcome = smaller(o)

    async def _recover(self, target: int) -> bool:
        """New producer (settles the failed transaction); True if that one committed."""
        attempt = 0
        while not self._closed:
            try:
                await self._replace_producer()
                committed = await self._read_committed(self.tp)
            except ProducerFenced as exc:
                raise _Fenced from exc
            except KafkaError as exc:
                delay = backoff_s(attempt)
                attempt += 1
                log.warning(
                    "transaction recovery failed id=%s error=%r retry_in_s=%.1f",
                    self.transactional_id,
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)
                continue
            if committed == target:
                return True
            if committed != self._lease.offsets.committed:
                raise _Fenced(f"committed offset moved to {committed} under us")
            return False
        return False

    async def _replace_producer(self) -> None:
        await self._stop_producer()
        producer = self._new_producer(self.transactional_id)
        try:
            await producer.start()  # InitProducerId: fences older producers with this id
        except BaseException:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(producer.stop(), PRODUCER_STOP_TIMEOUT_S)
            raise
        self._producer = producer

    async def _stop_producer(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            try:
                await asyncio.wait_for(producer.stop(), PRODUCER_STOP_TIMEOUT_S)
            except (KafkaError, TimeoutError) as exc:
                log.warning("stopping producer failed id=%s error=%r", self.transactional_id, exc)

    def _abandon_all(self, error: Exception | None = None) -> None:
        entries, self._ready = self._ready, {}
        for entry in entries.values():
            if not entry.committed.done():
                entry.committed.set_exception(
                    error or DeliveryAbandoned(f"{self.tp}: not committed")
                )
                entry.committed.exception()  # retrieved: a task may already have gone


class ExactlyOnce:
    """The exactly-once ``Delivery``: a ``PartitionWriter`` per lease."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        intake: Intake,
        producer_factory: ProducerFactory | None = None,
    ) -> None:
        self._settings = settings
        self._metrics = metrics
        self._intake = intake
        self._new_producer = producer_factory or (
            lambda transactional_id: transactional_producer(settings, transactional_id)
        )

    async def start(self) -> None:
        pass  # writers open with their leases

    async def open(self, lease: PartitionLease, on_fenced: OnFenced) -> None:
        lease.writer = PartitionWriter(
            lease, self._settings, self._metrics, self._committed, self._new_producer, on_fenced
        )
        await lease.writer.start()

    async def deliver(self, ticket: Ticket, outcome: Outcome) -> Outcome:
        writer: PartitionWriter | None = ticket.lease.writer
        if writer is None:
            raise DeliveryAbandoned(f"{ticket.lease.tp} has no writer")
        return await writer.deliver(ticket, outcome)

    async def commit(self, leases: list[PartitionLease]) -> None:
        pass  # each writer commits as soon as outcomes are ready

    async def close(self, lease: PartitionLease, timeout_s: float | None) -> None:
        if lease.writer is not None:
            await lease.writer.close(timeout_s)

    def abandon(self) -> None:
        pass  # closing a writer abandons what it could not commit

    async def stop(self) -> None:
        pass  # every writer was closed with its lease

    async def _committed(self, tp: TopicPartition) -> int | None:
        result: int | None = await self._intake.consumer.committed(tp)
        return result
