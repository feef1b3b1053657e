"""Which offset each partition may commit: the lowest one not yet done.

Records of a partition start in offset order but finish in any order (batches,
retries, dead letters). A partition may commit offset ``N`` only when every
record below ``N`` is done, meaning its prediction or dead letter was acked.
Per partition this is a queue of started offsets; finished ones are popped from
the front, so each operation is O(1) amortised.

Partitions are forgotten on revocation. A record started before the revocation
holds a ticket to the old state, so finishing it late changes nothing the new
owner (or a later assignment to us) will commit.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from aiokafka.structs import TopicPartition


@dataclass
class _PartitionState:
    started: deque[int] = field(default_factory=deque)
    done: set[int] = field(default_factory=set)
    next_commit: int | None = None  # offset to commit: everything below is done
    committed: int | None = None  # last offset committed to Kafka


@dataclass(frozen=True)
class Ticket:
    """Proof that a record was started; finish it with ``OffsetTracker.done``."""

    tp: TopicPartition
    offset: int
    state: _PartitionState


class OffsetTracker:
    def __init__(self) -> None:
        self._partitions: dict[TopicPartition, _PartitionState] = {}

    def start(self, tp: TopicPartition, offset: int) -> Ticket:
        state = self._partitions.setdefault(tp, _PartitionState())
        if state.started and offset <= state.started[-1]:
            raise ValueError(f"{tp} offset {offset} started out of order")
        state.started.append(offset)
        return Ticket(tp, offset, state)

    def is_current(self, ticket: Ticket) -> bool:
        """False once the ticket's partition was revoked, rewound or reassigned."""
        return self._partitions.get(ticket.tp) is ticket.state

    def done(self, ticket: Ticket) -> None:
        state = ticket.state
        if not self.is_current(ticket):
            return  # the partition was revoked (and maybe reassigned) meanwhile
        state.done.add(ticket.offset)
        while state.started and state.started[0] in state.done:
            offset = state.started.popleft()
            state.done.discard(offset)
            state.next_commit = offset + 1

    def pending(self, tp: TopicPartition) -> int:
        state = self._partitions.get(tp)
        return len(state.started) if state else 0

    def committed(self, tp: TopicPartition) -> int | None:
        state = self._partitions.get(tp)
        return state.committed if state else None

    def seed_committed(self, tp: TopicPartition, offset: int) -> None:
        """Record the group's committed offset found in Kafka on assignment (for lag)."""
        state = self._partitions.setdefault(tp, _PartitionState())
        if state.committed is None:
            state.committed = offset

    def committable(self, only: set[TopicPartition] | None = None) -> dict[TopicPartition, int]:
        """Offsets that moved since the last ``mark_committed``, per partition."""
        result = {}
        for tp, state in self._partitions.items():
            if only is not None and tp not in only:
                continue
            if state.next_commit is not None and state.next_commit != state.committed:
                result[tp] = state.next_commit
        return result

    def mark_committed(self, offsets: dict[TopicPartition, int]) -> None:
        for tp, offset in offsets.items():
            state = self._partitions.get(tp)
            if state is not None:
                state.committed = offset

    def forget(self, partitions: set[TopicPartition]) -> None:
        for tp in partitions:
            self._partitions.pop(tp, None)
