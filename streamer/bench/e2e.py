"""(c) and (d): Kafka -> process -> Kafka throughput on a pre-loaded input topic.

The input topic already holds the records when the process under test starts.
Every prediction lands on an output topic stamped with the broker's append
time; the run ends when the output topic holds one prediction per input record.
Throughput is counted between appends, after a warm-up of ``skip`` records, so
model loading and worker start-up are not part of it (the process's time to
ready is reported separately).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from streamer.bench.kafka_io import (
    forward_ms_by_batch_size,
    read_outputs,
    throughput,
    wait_for_count,
)
from streamer.bench.service import ChildProcess, MemorySampler, ServiceProcess


async def measure_drain(
    child: ChildProcess,
    options: dict[str, Any],
    output_topic: str,
    count: int,
    skip: int,
    timeout_s: float,
    ready_at: float | None = None,
) -> dict[str, Any]:
    """Wait for ``count`` predictions from the running ``child``; their throughput.

    Besides the drain after ``skip`` records: ``steady`` leaves the first 20% of the
    outputs out (the steady state), and with ``ready_at`` (the wall-clock time
    ``/readyz`` first answered 200) ``from_ready_images_per_s`` counts every record
    from that moment: the throughput of a cold start.
    """
    started = time.monotonic()
    await wait_for_count(options, output_topic, count, timeout_s, check=child.check_alive)
    outputs = (await read_outputs(options, output_topic))[:count]
    result: dict[str, Any] = throughput(outputs, skip)
    result["wall_s_including_start"] = time.monotonic() - started
    result["mean_batch_size"] = sum(o.batch_size for o in outputs) / len(outputs)
    result["forward_ms_by_batch_size"] = forward_ms_by_batch_size(outputs)
    result["steady"] = throughput(outputs, len(outputs) // 5)
    if ready_at is not None:
        span = outputs[-1].appended_ms / 1000 - ready_at
        result["from_ready_s"] = span
        result["from_ready_images_per_s"] = len(outputs) / span if span > 0 else 0.0
    return result


async def run_service_throughput(
    service: ServiceProcess,
    sampler: MemorySampler,
    options: dict[str, Any],
    count: int,
    ready_at: float | None = None,
) -> dict[str, Any]:
    """(c): the service (just ready, input pre-loaded) drains ``count`` records."""
    since = sampler.mark()
    result = await measure_drain(
        service,
        options,
        service.settings.output_topic,
        count,
        skip=service.settings.max_batch_size,
        timeout_s=max(600.0, count * 2.0),
        ready_at=ready_at,
    )
    result["memory"] = sampler.summary(since)
    return result


async def run_naive(
    options: dict[str, Any],
    input_topic: str,
    output_topic: str,
    group_id: str,
    weights: str,
    count: int,
    log_path: Path,
) -> dict[str, Any]:
    """(d): the naive baseline over the first ``count`` records of the same input topic."""
    naive = ChildProcess(
        [
            sys.executable,
            "-m",
            "streamer.bench.naive",
            "--bootstrap-servers",
            options["bootstrap_servers"],
            "--input-topic",
            input_topic,
            "--output-topic",
            output_topic,
            "--group-id",
            group_id,
            "--weights",
            weights,
        ],
        dict(os.environ),
        log_path,
    )
    naive.start()
    sampler = MemorySampler(naive.pid)
    await sampler.start()
    try:
        result = await measure_drain(
            naive, options, output_topic, count, skip=2, timeout_s=max(600.0, count * 10.0)
        )
    finally:
        await sampler.stop()
        naive.stop(timeout_s=10)
    result["memory"] = sampler.summary()
    return result
