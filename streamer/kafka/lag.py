"""Consumer-group lag as the brokers see it: committed offsets against end offsets.

The service exports the lag of the partitions it owns (``streamer_consumer_lag_records``),
so that series disappears with the last instance, exactly when the lag matters
most. ``LagReader`` asks the brokers instead and needs no member of the group:

1. a full metadata request lists the topics and their partitions (asking for a
   topic by name could auto-create it);
2. the group coordinator returns the group's committed offsets (OffsetFetch);
3. the partition leaders return the log start and end offsets (ListOffsets, read
   uncommitted: the high watermark, as in the service's own lag).

Lag per partition is ``end - committed``. A partition with nothing committed
counts what the group would read when it starts there: everything still in the
log with ``auto_offset_reset=earliest``, nothing with ``latest``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.structs import TopicPartition

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PartitionLag:
    """One partition's offsets for one group, at the time of one read."""

    topic: str
    partition: int
    committed: int | None  # None: the group has committed nothing here
    start: int  # log start offset (first offset still in the log)
    end: int  # high watermark
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"

    @property
    def lag(self) -> int:
        """Records the group has still to read in this partition."""
        if self.committed is None:
            return self.end - self.start if self.auto_offset_reset == "earliest" else 0
        return max(0, self.end - max(self.committed, self.start))


@dataclass(frozen=True)
class GroupLag:
    """The result of one read: every partition of the topics found, and those missing."""

    group: str
    partitions: list[PartitionLag]
    missing_topics: list[str]

    def total(self, topic: str | None = None) -> int:
        return sum(p.lag for p in self.partitions if topic is None or p.topic == topic)


class LagReader:
    """Reads one group's lag on some topics; clients are kept between reads.

    ``read`` starts the clients when needed, and closes them again after a failure
    so that the next read starts afresh (a broker that was away, a new address).
    """

    def __init__(
        self,
        options: dict[str, Any],
        group: str,
        topics: Sequence[str],
        auto_offset_reset: Literal["earliest", "latest"] = "earliest",
    ) -> None:
        """``options``: connection options (``streamer.kafka.clients.connection_options``)."""
        self.group = group
        self.topics = list(topics)
        self._options = options
        self._auto_offset_reset = auto_offset_reset
        self._admin: AIOKafkaAdminClient | None = None
        self._consumer: AIOKafkaConsumer | None = None

    async def start(self) -> None:
        if self._admin is not None:
            return
        admin = AIOKafkaAdminClient(**self._options)
        # No group: this consumer never joins, commits or fetches; it only asks for offsets.
        consumer = AIOKafkaConsumer(group_id=None, enable_auto_commit=False, **self._options)
        try:
            await admin.start()
            await consumer.start()
        except BaseException:
            await consumer.stop()
            await admin.close()
            raise
        self._admin, self._consumer = admin, consumer

    async def stop(self) -> None:
        """Close both clients; safe to call twice."""
        admin, self._admin = self._admin, None
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            await consumer.stop()
        if admin is not None:
            await admin.close()

    async def __aenter__(self) -> LagReader:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def read(self) -> GroupLag:
        """One read of every partition (see the module docstring for the steps)."""
        await self.start()
        try:
            return await self._read()
        except BaseException:
            await self.stop()
            raise

    async def _read(self) -> GroupLag:
        assert self._admin is not None and self._consumer is not None
        # Step 1: no topic names in the request, so none is auto-created.
        known = {
            t["topic"]: sorted(p["partition"] for p in t["partitions"])
            for t in await self._admin.describe_topics()
        }
        missing = [t for t in self.topics if not known.get(t)]
        tps = [TopicPartition(t, p) for t in self.topics if t not in missing for p in known[t]]
        if not tps:
            return GroupLag(self.group, [], missing)
        fetched = await self._admin.list_consumer_group_offsets(self.group, partitions=tps)
        starts = await self._consumer.beginning_offsets(tps)
        ends = await self._consumer.end_offsets(tps)
        partitions = []
        for tp in tps:
            meta = fetched.get(tp)
            committed = meta.offset if meta is not None and meta.offset >= 0 else None
            partitions.append(
                PartitionLag(
                    tp.topic,
                    tp.partition,
                    committed,
                    int(starts[tp]),
                    int(ends[tp]),
                    self._auto_offset_reset,
                )
            )
        return GroupLag(self.group, partitions, missing)
