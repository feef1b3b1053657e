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
        self.progressed_at = time.monotonic()  # last commit, or last time nothing was pending

    @property
    def pending(self) -> int:
        """Records started and not yet done."""
        return len(self._started)

    def start(self, offset: int) -> bool:
        """Start ``offset``; False (nothing changes) if it is not above the last one started."""
        if self._started and offset <= self._started[-1]:
            return False
        if not self._started:
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
        """Seconds without progress while records are pending (0 when none are)."""
        return now - self.progressed_at if self._started else 0.0
