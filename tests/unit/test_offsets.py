from __future__ import annotations

import pytest
from aiokafka.structs import TopicPartition

from streamer.kafka.offsets import OffsetTracker

TP = TopicPartition("images", 0)
TP1 = TopicPartition("images", 1)


def test_commits_only_below_the_first_unfinished_offset() -> None:
    tracker = OffsetTracker()
    tickets = [tracker.start(TP, offset) for offset in (10, 11, 12, 13)]
    tracker.done(tickets[1])
    tracker.done(tickets[3])
    assert tracker.committable() == {}  # 10 is still in flight
    tracker.done(tickets[0])
    assert tracker.committable() == {TP: 12}  # 12 is still in flight
    tracker.done(tickets[2])
    assert tracker.committable() == {TP: 14}


def test_committable_reports_only_partitions_that_moved() -> None:
    tracker = OffsetTracker()
    tracker.done(tracker.start(TP, 0))
    tracker.done(tracker.start(TP1, 5))
    assert tracker.committable() == {TP: 1, TP1: 6}
    tracker.mark_committed({TP: 1})
    assert tracker.committable() == {TP1: 6}
    assert tracker.committable(only={TP}) == {}
    assert tracker.committed(TP) == 1


def test_offset_gaps_are_allowed_but_order_is_enforced() -> None:
    tracker = OffsetTracker()
    first = tracker.start(TP, 3)
    tracker.start(TP, 7)  # compacted or transactional topics skip offsets
    with pytest.raises(ValueError):
        tracker.start(TP, 5)
    tracker.done(first)
    assert tracker.committable() == {TP: 4}
    assert tracker.pending(TP) == 1


def test_late_ack_after_revocation_changes_nothing() -> None:
    tracker = OffsetTracker()
    stale = tracker.start(TP, 0)
    tracker.forget({TP})
    fresh = tracker.start(TP, 0)  # reassigned: the record is fetched again
    tracker.done(stale)
    assert tracker.committable() == {}
    tracker.done(fresh)
    assert tracker.committable() == {TP: 1}
