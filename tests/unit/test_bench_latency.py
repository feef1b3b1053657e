"""The latency phases' inference busy share, read from the service's /metrics page."""

from __future__ import annotations

import pytest
from prometheus_client import generate_latest

from streamer.bench.latency import BusyReading, busy_share, read_busy
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


def test_a_page_without_the_counter_is_an_error_not_a_zero() -> None:
    metrics = Metrics()
    text = generate_latest(metrics.registry).decode()  # no inference workers yet
    with pytest.raises(ValueError, match="no inference busy time or workers"):
        read_busy(text, at_s=0.0)
