"""The latency-target batch policy's decisions, against a fake batch-time table t(b)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from streamer.pipeline import batch_policy
from streamer.pipeline.batch_policy import FixedPolicy, LatencyTargetPolicy
from streamer.pipeline.batcher import Batcher

pytestmark = pytest.mark.timeout(10)


def linear(b: int) -> float:
    """A CPU-like table: 10 ms per batch plus 20 ms per image."""
    return 0.010 + 0.020 * b


def policy(target_s: float = 0.5, table=linear, max_batch: int = 32, delay_s: float = 0.05):
    return LatencyTargetPolicy(target_s, max_batch, delay_s, table)


def test_without_a_target_the_settings_decide() -> None:
    fixed = FixedPolicy(32, 0.01)
    assert (fixed.size_limit(3, 100), fixed.fill_wait_s(3, 100)) == (32, 0.01)


def test_steady_state_picks_the_smallest_efficient_batch_the_budget_allows() -> None:
    """A benchmark at 90% of peak: the policy took the largest batch the
    budget allowed (about 13 on that CPU), where 4 was as fast per image. Its batches
    averaged 4.6 records against 2.3 without a target, and its p99 was 0.679 s against
    0.388 s: the target made latency worse."""
    p = policy(target_s=0.5)
    # The budget allows 12 (2 * t(12) = 0.5), but 8 already gives 47.1 images/s of the
    # best 49.2 (within 5%): 12 would add latency for 2% more throughput.
    assert p.size_limit(queued=1, backlog=0) == 8
    assert p.fill_wait_s(queued=1, backlog=0) == 0.05  # 0.5 - 2 * t(8) = 0.16, capped
    # A tighter budget decides: 2 * t(7) = 0.30 <= 0.32 < 2 * t(8) = 0.34
    assert policy(target_s=0.32).size_limit(queued=1, backlog=0) == 7
    # Nothing left of the budget for waiting: run what is there.
    assert policy(target_s=0.34).fill_wait_s(queued=1, backlog=0) == pytest.approx(0, abs=1e-9)


def test_steady_state_waits_what_the_budget_leaves_but_no_more_than_the_delay() -> None:
    flat = policy(target_s=2.0, table=lambda b: 0.1, max_batch=8, delay_s=0.05)
    assert flat.size_limit(1, 0) == 8  # 2 * t(8) = 0.2: 1.8 s left
    assert flat.fill_wait_s(1, 0) == 0.05
    p = policy(target_s=2.0, max_batch=8, delay_s=0.05)  # efficient: 5; 2 * t(5) = 0.22
    assert p.size_limit(1, 0) == 5
    assert p.fill_wait_s(1, 0) == 0.05
    roomy = policy(target_s=0.4, table=lambda b: 0.1, max_batch=8, delay_s=1.0)
    assert roomy.fill_wait_s(1, 0) == pytest.approx(0.2)  # 0.4 - 2 * 0.1


def test_a_tight_target_means_batches_of_one() -> None:
    assert policy(target_s=0.05).size_limit(1, 0) == 1


def test_under_lag_it_drains_with_the_most_efficient_batch() -> None:
    p = policy(target_s=0.1)  # the budget alone would say 1
    assert p.lagging(queued=4, backlog=40)
    assert p.size_limit(queued=4, backlog=40) == 32  # throughput grows with b here
    assert p.fill_wait_s(queued=4, backlog=40) == 0.05  # wait for the records being decoded
    assert p.fill_wait_s(queued=32, backlog=40) == 0.0

    # A table where 16 is clearly faster per image than 32 (e.g. a cache cliff).
    cliff = {16: 0.3, 32: 1.0}
    p = policy(table=lambda b: cliff.get(b), max_batch=32)
    assert p.size_limit(queued=32, backlog=0) == 16


def test_with_no_measurement_yet_it_allows_the_largest_batch() -> None:
    p = policy(table=lambda b: None, target_s=0.5, delay_s=0.05)
    assert p.size_limit(1, 0) == 32
    assert p.fill_wait_s(1, 0) == 0.05


def test_a_missed_target_shrinks_the_budget_and_a_met_one_grows_it_back() -> None:
    p = policy(target_s=0.32)
    assert p.headroom_s is None
    assert p.size_limit(1, 0) == 7  # 2 * t(7) = 0.30 <= 0.32
    for _ in range(batch_policy.ADJUST_EVERY):
        p.observe(0.8, lagging=False)
    assert p.factor == pytest.approx(batch_policy.DECREASE)
    assert p.headroom_s == pytest.approx(-0.48)
    assert p.size_limit(1, 0) == 5  # 2 * t(5) = 0.22 <= 0.256 < 2 * t(6)
    # Fast again: the budget keeps shrinking while slow ones are in the p99 window,
    # then grows back additively (one step per ADJUST_EVERY observations).
    for _ in range(4 * batch_policy.WINDOW):
        p.observe(0.1, lagging=False)
    assert p.factor == 1.0
    assert p.headroom_s == pytest.approx(0.22)


def test_latencies_observed_under_lag_do_not_move_the_budget() -> None:
    p = policy(target_s=0.5)
    for _ in range(10 * batch_policy.ADJUST_EVERY):
        p.observe(30.0, lagging=True)  # a backlog being drained: queueing, not batching
    assert p.factor == 1.0 and p.p99_s is None


def test_records_fetched_later_than_the_target_do_not_move_the_budget() -> None:
    p = policy(target_s=0.5)
    for _ in range(10 * batch_policy.ADJUST_EVERY):  # a backlog left while it was down
        p.observe(38.0, lagging=False, fetched_after_s=37.0)
    assert p.factor == 1.0 and p.p99_s is None
    for _ in range(batch_policy.ADJUST_EVERY):  # fetched in time, late in the service
        p.observe(0.9, lagging=False, fetched_after_s=0.4)
    assert p.factor < 1.0 and p.p99_s == pytest.approx(0.9)


def test_the_factor_never_falls_below_its_floor() -> None:
    p = policy(target_s=0.5)
    for _ in range(50 * batch_policy.ADJUST_EVERY):
        p.observe(5.0, lagging=False)
    assert p.factor == pytest.approx(batch_policy.MIN_FACTOR)


async def test_the_batcher_dispatches_the_size_the_policy_chose() -> None:
    batches: list[list[int]] = []

    async def run(items: Sequence[int]) -> list[int]:
        batches.append(list(items))
        return list(items)

    # t(b) = 0.03 max(b, 3): 3 is the smallest efficient size, and 2 * t(3) = 0.18 <= 0.3,
    # so steady-state batches of 3, waiting 0.05 s at most.
    p = LatencyTargetPolicy(0.3, 8, 0.05, lambda b: 0.03 * max(b, 3))
    backlog = 0
    async with Batcher(
        run, max_batch_size=8, max_batch_delay_ms=50, policy=p, backlog=lambda: backlog
    ) as batcher:
        await asyncio.wait_for(asyncio.gather(*(batcher.submit(i) for i in range(7))), 2)
        assert batches == [[0, 1, 2], [3, 4, 5], [6]]
        batches.clear()
        backlog = 20  # lag: drain with the largest batch
        await asyncio.wait_for(asyncio.gather(*(batcher.submit(i) for i in range(8))), 2)
    assert batches == [list(range(8))]


def test_batches_the_budget_allows_grow_when_they_cannot_keep_up_with_arrivals() -> None:
    p = policy(target_s=0.5)  # budget and efficiency: 8 (8 / 0.17 = 47.1 per second)
    for i in range(80):  # 40 per second over the 2 s window: 48 needed, 12 is the first
        p.arrived(i * 0.025)  # that serves it (12 / 0.25 = 48)
    assert p.rate_per_s == pytest.approx(40, rel=0.05)
    assert p.size_limit(1, 0) == 12
    for i in range(120):  # 60 per second: 72 needed, but b / (0.01 + 0.02 b) < 50 for
        p.arrived(2.0 + i / 60)  # every b: nothing keeps up, so the efficient size, 8
    assert p.size_limit(1, 0) == 8  # (47.1 per second, within 5% of 32's 49.2)


def test_when_no_batch_has_the_margin_the_efficient_size_is_taken_not_the_drain_size() -> None:
    p = policy(target_s=0.5)  # budget: 12; efficiency: 8 (47.1 per second)
    for i in range(84):  # 42 per second: 50.4 needed with the margin, which no size has
        p.arrived(i / 42)  # (32 gives 49.2)
    assert p.size_limit(1, 0) == 8  # not the drain size, 32 (0.65 s a batch)


def test_records_already_queued_may_fill_a_batch_up_to_the_efficient_size() -> None:
    p = policy(target_s=0.1)  # the budget's size: 2 (2 t(2) = 0.1 s); efficient: 8
    assert p.size_limit(1, 0) == 2
    assert p.size_limit(6, 0) == 6  # six are waiting already: one batch, not three
    assert p.size_limit(20, 0) == 8  # no more than the efficient size
    assert p.fill_wait_s(6, 0) == 0.0  # 2 t(6) is past the budget: no waiting for more


def test_when_nothing_keeps_up_it_takes_the_most_efficient_batch_not_the_largest() -> None:
    def cliff(b: int) -> float:  # 16 images fit in cache; larger batches are half as fast
        return 0.010 + 0.020 * b if b <= 16 else 0.04 * b

    p = policy(target_s=0.5, table=cliff)
    for i in range(200):  # 100 per second: more than any size serves
        p.arrived(i / 100)
    # 6 runs 46.2 images/s, within 5% of 16's 48.5 (the best) in 0.13 s; 32 gives 25.
    assert p.size_limit(1, 0) == 6
    assert p.size_limit(40, 0) == 16  # lagging: the drain size


def test_with_a_fixed_cost_per_batch_the_smallest_size_that_keeps_up_is_chosen() -> None:
    p = policy(target_s=0.5, table=lambda b: 0.2 + 0.01 * b)  # budget alone: 5 (20 per s)
    assert p.size_limit(1, 0) == 5
    for i in range(60):  # 30 per second: 36 needed, b / (0.2 + 0.01 b) >= 36 from b = 12
        p.arrived(i / 30)
    assert p.size_limit(1, 0) == 12


def test_with_two_workers_a_batch_keeps_up_at_twice_the_rate_one_worker_serves() -> None:
    table = lambda b: 0.2 + 0.01 * b  # noqa: E731  budget alone: 5 (20 per second each)
    one = LatencyTargetPolicy(0.5, 32, 0.05, table)
    two = LatencyTargetPolicy(0.5, 32, 0.05, table, workers=2)
    for p in (one, two):
        for i in range(60):  # 30 per second: 36 needed
            p.arrived(i / 30)
    assert one.size_limit(1, 0) == 12  # 12 / 0.32 = 37.5 per second
    assert two.size_limit(1, 0) == 5  # 2 x 5 / 0.25 = 40 per second: the budget's size


def test_the_arrival_rate_counts_only_the_last_window() -> None:
    p = policy()
    for i in range(10):
        p.arrived(float(i) / 10)
    p.arrived(10.0)
    assert p.rate_per_s == pytest.approx(1 / batch_policy.RATE_WINDOW_S)


# The batch size from the table measured as the model loads (batch_size_from_table).

CPU_TABLE = {1: 0.028, 2: 0.051, 4: 0.090, 8: 0.171, 16: 0.341, 32: 0.632, 64: 1.520}


@pytest.mark.parametrize(
    ("table", "best"),
    [
        (CPU_TABLE, 32),  # 50.6 img/s; 16 gives 46.9 (7% less), 64 gives 42.1
        ({1: 0.01, 8: 0.02, 16: 0.0405, 32: 0.081}, 8),  # 16 and 32 are no faster than 8
        ({8: 0.004, 64: 0.010, 256: 0.030}, 256),  # a GPU: the largest batch
        ({4: 0.0, 8: 0.0}, 8),  # nothing measurable (the null model): the largest
    ],
)
def test_the_best_batch_is_the_smallest_within_5_percent_of_the_best_rate(
    table: dict[int, float], best: int
) -> None:
    assert batch_policy.best_batch_size(table) == best


def test_the_timed_sizes_are_powers_of_two_up_to_the_max() -> None:
    assert batch_policy.timed_sizes(32) == (1, 2, 4, 8, 16, 32)
    assert batch_policy.timed_sizes(24) == (1, 2, 4, 8, 16, 24)
    assert batch_policy.timed_sizes(1) == (1,)


def test_the_policy_sees_sizes_it_has_not_run_through_the_scaled_load_time_table() -> None:
    """In a benchmark, a policy that had only run batches of 32 drained with 32,
    where 8 was a third faster per record, and never caught up at 90% of peak."""
    times = batch_policy.BatchTimes()
    table = {1: 0.028, 2: 0.043, 4: 0.067, 8: 0.133, 16: 0.287, 32: 0.700}
    assert times.estimated_s(8) is None  # nothing measured, no table: unknown
    times.use_table(table)
    assert times.estimated_s(8) is None  # a table alone is not trusted
    times.observe(32, 0.910)  # the worker runs 1.3x slower than on an idle machine
    assert times.estimated_s(32) == pytest.approx(0.910)
    assert times.estimated_s(8) == pytest.approx(0.133 * 1.3)
    assert times.estimated_s(12) == pytest.approx((0.133 + 0.287) / 2 * 1.3)
    assert times.estimated_s(64) == pytest.approx(0.910 * 2)  # beyond the table: bounded
    p = LatencyTargetPolicy(0.5, 32, 0.05, times.estimated_s)
    assert p.size_limit(queued=200, backlog=100) < 32  # drains with a faster size
