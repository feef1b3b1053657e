"""End-to-end latency under a steady offered load, and the per-phase summary.

A producer coroutine sends records on a fixed schedule (``rate`` per second) to
the running service's input topic. Latency of a record = the broker's append
time of its prediction (LogAppendTime on the output topic; acks=all on one
broker, so this is when the write is acknowledged, to within the ack's trip back)
minus the input record's CreateTime (set by our producer when it sends). Both
are wall-clock milliseconds from this machine. Records sent in the first
``warmup_s`` of a phase are left out.

Each phase also reports how busy the inference workers were, as the service
measures it (``streamer_inference_busy_seconds_total`` over the phase, divided by
its length and the workers alive): the utilisation that p99 depends on, so a
missed latency target says why with a figure of the same run. The phase runs
from just before its first send to when the benchmark sees its last prediction
(polled each second), so the share reads slightly low; a batch's time counts
from the worker's clock, including any wait for a core. Next to it, the
whole machine's busy cores (``/proc/stat``), the broker and this load generator
included, since they share the service's cores here.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

from streamer.bench.kafka_io import (
    forward_ms_by_batch_size,
    produce_paced,
    read_outputs,
    wait_for_count,
)
from streamer.bench.service import (
    MachineCpu,
    MemorySampler,
    ServiceProcess,
    metric_value,
    scrape_metrics,
)
from streamer.config import Settings

log = logging.getLogger(__name__)


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values."""
    if not sorted_values:
        return 0.0
    rank = max(0, min(len(sorted_values) - 1, math.ceil(q / 100 * len(sorted_values)) - 1))
    return sorted_values[rank]


@dataclass(frozen=True)
class BusyReading:
    """The service's inference busy seconds and workers alive, read at ``at_s``
    (``time.monotonic()``)."""

    at_s: float
    busy_s: float
    workers: float


def read_busy(metrics_text: str, at_s: float) -> BusyReading:
    busy = metric_value(metrics_text, "streamer_inference_busy_seconds_total")
    workers = metric_value(metrics_text, "streamer_workers_alive", kind="inference")
    if busy is None or workers is None:
        raise ValueError("the service's /metrics has no inference busy time or workers")
    return BusyReading(at_s, busy, workers)


def busy_share(first: BusyReading | None, last: BusyReading | None) -> float | None:
    """The inference workers' busy share between two readings: busy seconds over
    wall seconds times the workers alive at the end; None over no time or workers,
    or when a reading failed."""
    if first is None or last is None:
        return None
    seconds = last.at_s - first.at_s
    if seconds <= 0 or last.workers <= 0:
        return None
    return (last.busy_s - first.busy_s) / (seconds * last.workers)


async def _busy_now(settings: Settings) -> BusyReading | None:
    """A reading, or None (logged) when the page cannot be read: the phase's
    latencies are still worth having without it."""
    try:
        text = await asyncio.to_thread(scrape_metrics, settings)
        return read_busy(text, time.monotonic())
    except (OSError, ValueError) as exc:
        log.warning("no inference busy reading from the service's /metrics: %s", exc)
        return None


async def run_latency(
    service: ServiceProcess,
    sampler: MemorySampler,
    options: dict[str, Any],
    payloads: list[bytes],
    rate_per_s: float,
    duration_s: float,
    warmup_s: float,
    expected_before: int,
) -> dict[str, Any]:
    """One steady-rate phase; ``expected_before`` = predictions already on the output topic."""
    s = service.settings
    since = sampler.mark()
    busy_before, machine_before = await _busy_now(s), MachineCpu.now()
    run = await produce_paced(options, s.input_topic, payloads, rate_per_s, duration_s)
    await wait_for_count(
        options,
        s.output_topic,
        expected_before + run.sent,
        timeout_s=600.0,
        check=service.check_alive,
    )
    busy_after, machine_after = await _busy_now(s), MachineCpu.now()
    first_counted = run.first_ms + int(warmup_s * 1000)
    outputs = [
        o
        for o in await read_outputs(options, s.output_topic)
        if first_counted <= o.source_ms <= run.last_ms
    ]
    latencies = sorted((o.appended_ms - o.source_ms) / 1000 for o in outputs)
    return {
        "offered_per_s": rate_per_s,
        "achieved_per_s": run.achieved_per_s,
        "sent": run.sent,
        "counted": len(latencies),
        "p50_s": percentile(latencies, 50),
        "p95_s": percentile(latencies, 95),
        "p99_s": percentile(latencies, 99),
        "max_s": latencies[-1] if latencies else 0.0,
        "mean_batch_size": sum(o.batch_size for o in outputs) / max(1, len(outputs)),
        "forward_ms_by_batch_size": forward_ms_by_batch_size(outputs),
        # From just before the first send to the last prediction seen (tail drain too).
        "inference_busy": busy_share(busy_before, busy_after),
        # Every process: the service, the broker, and this load generator.
        "machine_busy_cores": machine_after.busy_cores_since(machine_before),
        "latencies_s": latencies,
        "memory": sampler.summary(since),
        "produced_total": expected_before + run.sent,
    }
