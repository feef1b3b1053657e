"""PartitionOffsets, and a lease's rule that only its own active tickets count."""

from __future__ import annotations

import time

import pytest
from aiokafka.structs import TopicPartition

from streamer.kafka.offsets import PartitionOffsets
from streamer.kafka.partitions import LeaseState, PartitionLease

pytestmark = pytest.mark.timeout(10)

TP = TopicPartition("images", 0)


def active_lease(epoch: int = 1) -> PartitionLease:
    lease = PartitionLease(TP, epoch)
    lease.state = LeaseState.ACTIVE
    return lease


def test_commits_only_below_the_first_unfinished_offset() -> None:
    offsets = PartitionOffsets()
    for offset in (10, 11, 12, 13):
        offsets.start(offset)
    offsets.done(11)
    offsets.done(13)
    assert offsets.committable() is None  # 10 is still in flight
    offsets.done(10)
    assert offsets.committable() == 12  # 12 is still in flight
    offsets.done(12)
    assert offsets.committable() == 14


def test_committable_reports_only_a_move() -> None:
    offsets = PartitionOffsets(committed=0)
    offsets.start(0)
    offsets.done(0)
    assert offsets.committable() == 1
    offsets.mark_committed(1)
    assert offsets.committable() is None and offsets.committed == 1


def test_offset_gaps_are_allowed_but_order_is_enforced() -> None:
    offsets = PartitionOffsets()
    assert offsets.start(3)
    assert offsets.start(7)  # compacted or transactional topics skip offsets
    assert not offsets.start(5) and not offsets.start(7)
    offsets.done(3)
    assert offsets.committable() == 4
    assert offsets.pending == 1


def test_a_stall_is_time_without_progress_while_records_are_pending() -> None:
    offsets = PartitionOffsets()
    assert offsets.stalled_for(offsets.progressed_at + 1000) == 0.0  # nothing pending
    offsets.start(0)
    assert offsets.stalled_for(offsets.progressed_at + 1000) == pytest.approx(1000)
    offsets.done(0)
    offsets.mark_committed(1)
    assert offsets.stalled_for(offsets.progressed_at + 1000) == 0.0


def test_lag_with_nothing_fetched_is_a_stall_and_catching_up_is_progress() -> None:
    offsets = PartitionOffsets(committed=10)
    offsets.observe(highwater=10)  # caught up: idle, not stalled
    assert offsets.stalled_for(offsets.progressed_at + 1000) == 0.0
    offsets.observe(highwater=15)  # five records wait, and none is fetched (nothing pending)
    assert offsets.lag == 5
    assert offsets.stalled_for(offsets.progressed_at + 1000) == pytest.approx(1000)
    offsets.mark_committed(15)
    offsets.observe(highwater=15)
    assert offsets.lag == 0
    assert offsets.stalled_for(offsets.progressed_at + 1000) == 0.0


def test_a_consumer_past_the_end_is_idle_though_a_commit_marker_keeps_lag_at_one() -> None:
    offsets = PartitionOffsets(committed=10)  # records 0-9, then a transaction's marker at 10
    offsets.observe(highwater=11, position=11)
    assert offsets.lag == 1
    assert offsets.stalled_for(offsets.progressed_at + 1000) == 0.0
    offsets.observe(highwater=12, position=11)  # a new record is not fetched yet
    assert offsets.stalled_for(offsets.progressed_at + 1000) == pytest.approx(1000)


def test_an_idle_partition_that_gets_new_records_starts_its_stall_clock_then() -> None:
    offsets = PartitionOffsets(committed=10)
    offsets.progressed_at -= 3600  # idle and caught up for an hour
    offsets.observe(highwater=10)
    assert offsets.stalled_for(time.monotonic()) < 1.0
    offsets.observe(highwater=11)
    assert offsets.stalled_for(time.monotonic()) < 1.0, "the hour idle is not a stall"


def test_late_ack_after_the_lease_ended_changes_nothing() -> None:
    old = active_lease(1)
    stale = old.start(0)
    assert stale is not None
    old.state = LeaseState.ENDED  # revoked
    new = active_lease(2)  # reassigned: the record is fetched again under a new lease
    fresh = new.start(0)
    assert fresh is not None
    old.done(stale)
    new.done(stale)  # a ticket of another lease counts nowhere
    assert old.offsets.committable() is None and new.offsets.committable() is None
    new.done(fresh)
    assert new.offsets.committable() == 1


def test_an_inactive_lease_starts_nothing() -> None:
    lease = PartitionLease(TP, 1)  # still seeking
    assert lease.start(0) is None
    lease.state = LeaseState.ACTIVE
    assert lease.start(0) is not None
    assert lease.start(0) is None, "an offset starts once per lease"


async def test_an_idle_lease_drains_at_once_even_with_no_time_left() -> None:
    lease = active_lease()
    assert await lease.drain(0.0)
    ticket = lease.start(0)
    assert ticket is not None and not await lease.drain(0.0)
    lease.done(ticket)
    assert await lease.drain(0.0)
