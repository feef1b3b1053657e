"""Which offset one partition may commit: the lowest one not yet done.

Records of a partition start in offset order but finish in any order (batches,
retries, dead letters). The partition may commit offset ``N`` only when every
record below ``N`` is done, meaning its prediction or dead letter was acked (or is
ready for its transaction). Started offsets wait in a queue; finished ones are
popped from the front, so each operation is O(1) amortised.

One ``PartitionOffsets`` belongs to one ``PartitionLease`` and is changed only
through it (``streamer.kafka.partitions``); a new lease starts a new one, so
nothing of an earlier assignment can leak into a later one.
"""

from __future__ import annotations

import time
from collections import deque


class PartitionOffsets:
    def __init__(self, committed: int | None = None) -> None:
        self._started: deque[int] = deque()
        self._done: set[int] = set()
        self.next_commit: int | None = None  # everything below it is done
        self.committed = committed  # last offset committed to Kafka (or found there)
        self.highwater: int | None = None  # the partition's end, as the last fetch saw it
        self.position: int | None = None  # the next offset the consumer fetches
        # Last commit, or the last time the partition had nothing to do (nothing pending
        # and no lag): the stall clock (``stalled_for``) runs from here.
        self.progressed_at = time.monotonic()

    @property
    def pending(self) -> int:
        """Records started and not yet done."""
        return len(self._started)

    @property
    def lag(self) -> int:
        """Records between the committed offset and the partition's end (0 when unknown)."""
        if self.highwater is None or self.committed is None:
            return 0
        return max(0, self.highwater - self.committed)

    def observe(self, highwater: int | None, position: int | None = None) -> None:
        """Record the partition's end and the consumer's position there.

        An idle partition's stall clock starts only when it stops being idle."""
        if self._idle:
            self.progressed_at = time.monotonic()
        self.highwater, self.position = highwater, position

    @property
    def _idle(self) -> bool:
        """Nothing pending and nothing left to fetch. The position counts too: after the
        last record of a transaction, the commit marker keeps the lag at 1 for good."""
        if self._started:
            return False
        fetched_all = None not in (self.position, self.highwater) and (
            self.position >= self.highwater  # type: ignore[operator]
        )
        return self.lag == 0 or fetched_all

    def start(self, offset: int) -> bool:
        """Start ``offset``; False (nothing changes) if it is not above the last one started."""
        if self._started and offset <= self._started[-1]:
            return False
        if self._idle:
            self.progressed_at = time.monotonic()  # idle until now: not a stall
        self._started.append(offset)
        return True

    def done(self, offset: int) -> None:
        self._done.add(offset)
        while self._started and self._started[0] in self._done:
            finished = self._started.popleft()
            self._done.discard(finished)
            self.next_commit = finished + 1

    def committable(self) -> int | None:
        """The offset to commit now, or None when nothing moved since the last commit."""
        if self.next_commit is not None and self.next_commit != self.committed:
            return self.next_commit
        return None

    def mark_committed(self, offset: int) -> None:
        self.committed = offset
        self.progressed_at = time.monotonic()

    def stalled_for(self, now: float) -> float:
        """Seconds without progress while records are pending or lag waits (0 when idle)."""
        return 0.0 if self._idle else now - self.progressed_at
