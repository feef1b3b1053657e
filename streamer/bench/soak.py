"""RSS soak: the service's memory under a steady load for a configurable time.

Records are produced at a fixed rate (a fraction of the measured peak) for
``duration_s``; the memory sampler runs throughout. The RSS (summed over the
service and its workers) at each checkpoint, e.g. 2 and 10 minutes into the
load, is the sample nearest to it; "flat" means the last checkpoint is within
``tolerance`` of the first.
"""

from __future__ import annotations

from typing import Any

from streamer.bench.kafka_io import produce_paced, wait_for_count
from streamer.bench.service import MemorySampler, ServiceProcess


async def run_soak(
    service: ServiceProcess,
    sampler: MemorySampler,
    options: dict[str, Any],
    payloads: list[bytes],
    rate_per_s: float,
    duration_s: float,
    checkpoints_s: tuple[float, ...],
    expected_before: int,
    tolerance: float = 0.05,
) -> dict[str, Any]:
    s = service.settings
    start = sampler.mark()
    await sampler.sample_now()
    run = await produce_paced(options, s.input_topic, payloads, rate_per_s, duration_s)
    await sampler.sample_now()
    await wait_for_count(
        options,
        s.output_topic,
        expected_before + run.sent,
        timeout_s=600.0,
        check=service.check_alive,
    )
    window = [x for x in sampler.samples if start <= x.t_s <= start + duration_s + 1]
    series = [
        {"t_s": x.t_s - start, "rss_bytes": x.rss_bytes, "pss_bytes": x.pss_bytes, "load1": x.load1}
        for x in window
    ]
    points = []
    for mark in checkpoints_s:
        nearest = min(series, key=lambda x: abs(x["t_s"] - mark))
        points.append({"checkpoint_s": mark, **nearest})
    first, last = points[0], points[-1]
    rss_change = (last["rss_bytes"] - first["rss_bytes"]) / first["rss_bytes"]
    pss_change = (last["pss_bytes"] - first["pss_bytes"]) / first["pss_bytes"]
    return {
        "duration_s": duration_s,
        "offered_per_s": rate_per_s,
        "achieved_per_s": run.achieved_per_s,
        "sent": run.sent,
        "checkpoints": points,
        "rss_change": rss_change,
        "pss_change": pss_change,
        "flat": abs(rss_change) <= tolerance,
        "tolerance": tolerance,
        "series": series,
        "produced_total": expected_before + run.sent,
    }
