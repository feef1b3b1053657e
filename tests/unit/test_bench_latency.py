"""The latency phases' inference busy share, read from the service's /metrics page."""

from __future__ import annotations

import os
import time

import pytest
from prometheus_client import generate_latest

from streamer.bench.latency import BusyReading, busy_share, read_busy
from streamer.bench.service import CLOCK_TICKS, MachineCpu
from streamer.metrics import Metrics

pytestmark = pytest.mark.timeout(10)


def page(busy_s: float, inference_workers: int) -> str:
    metrics = Metrics()
    metrics.inference_busy.inc(busy_s)
    metrics.workers_alive.labels("decode").set(5)  # another kind: not counted
    metrics.workers_alive.labels("inference").set(inference_workers)
    return generate_latest(metrics.registry).decode()


def test_the_busy_share_is_busy_seconds_over_wall_seconds_times_workers() -> None:
    first = read_busy(page(10.0, 2), at_s=100.0)
    last = read_busy(page(46.0, 2), at_s=120.0)
    assert (first.busy_s, first.workers) == (10.0, 2)
    assert busy_share(first, last) == pytest.approx(36.0 / (20.0 * 2))


def test_no_time_or_no_workers_gives_no_share() -> None:
    assert busy_share(BusyReading(5.0, 1.0, 2), BusyReading(5.0, 2.0, 2)) is None
    assert busy_share(BusyReading(5.0, 1.0, 2), BusyReading(6.0, 2.0, 0)) is None


def test_a_page_without_the_counter_or_the_workers_is_an_error_not_a_zero() -> None:
    no_workers = generate_latest(Metrics().registry).decode()  # no inference workers yet
    no_counter = 'streamer_workers_alive{kind="inference"} 2.0\n'  # another process's page
    for text in (no_workers, no_counter):
        with pytest.raises(ValueError, match="no inference busy time or workers"):
            read_busy(text, at_s=0.0)
    # A phase whose reading failed has no share, and the report leaves it out.
    assert busy_share(None, BusyReading(1.0, 1.0, 2)) is None
    assert busy_share(BusyReading(1.0, 1.0, 2), None) is None


def test_machine_busy_cores_is_busy_time_over_all_time_times_the_cores() -> None:
    first = MachineCpu(busy_s=10.0, all_s=100.0, cores=2)
    # 20 s of machine time passed (10 s per core), 15 of them busy: 1.5 cores.
    assert MachineCpu(25.0, 120.0, 2).busy_cores_since(first) == pytest.approx(1.5)
    assert MachineCpu(10.0, 100.0, 2).busy_cores_since(first) is None  # no time passed
    # Every core busy reads as every core, whatever rounding the tick counts carry.
    assert MachineCpu(10.0 + 0.02, 100.0 + 0.02, 2).busy_cores_since(first) == 2.0


def test_steal_time_is_not_the_machine_s_work() -> None:
    # user nice system idle iowait irq softirq steal: 100 ticks a second (SC_CLK_TCK)
    stat = "cpu  300 0 100 500 0 0 0 100 0 0\ncpu0 150 0 50 250 0 0 0 50 0 0\n"
    stat += "cpu1 150 0 50 250 0 0 0 50 0 0\nintr 1\n"
    reading = MachineCpu.parse(stat)
    assert reading.cores == 2
    assert reading.busy_s * CLOCK_TICKS == pytest.approx(400)  # user + system, not steal
    assert reading.all_s * CLOCK_TICKS == pytest.approx(1000)


def test_machine_cpu_reads_this_machine() -> None:
    first = MachineCpu.now()
    deadline = time.monotonic() + 5
    while (last := MachineCpu.now()).all_s <= first.all_s:  # a clock tick later
        assert time.monotonic() < deadline, "/proc/stat did not move in 5 s"
    assert first.cores == os.cpu_count()
    assert 0 <= first.busy_s <= first.all_s
    cores = last.busy_cores_since(first)
    assert cores is not None and 0 <= cores <= first.cores
