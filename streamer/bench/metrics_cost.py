"""The cost of the service's metric calls, measured directly.

The service has no "metrics off" switch, and an A/B throughput run on a
2-core machine is noisier than the 2% it would have to resolve. So this times
the exact metric calls the service makes per record (see ``per_record``) on a
real ``Metrics`` registry, plus one ``/metrics`` scrape (rendering the registry),
and relates them to the measured end-to-end throughput:

    share = (calls per record x records per second + scrape x scrapes per second)
            / cores

i.e. the fraction of the machine's CPU the metrics take at that throughput,
which bounds the throughput they can cost (the calls run on the event loop,
not on the cores doing decode and inference, so the real loss is at most this).
"""

from __future__ import annotations

import os
import time
from typing import Any

from prometheus_client import generate_latest

from streamer.metrics import Metrics

TOPIC = "bench-in"
STAGES = ("kafka", "permit_wait", "decode", "batch_wait", "inference", "produce", "end_to_end")


def per_record(m: Metrics, batch_size: int, i: int) -> None:
    """What the intake loop, processor, publisher and engine record for one prediction."""
    m.records_consumed.labels(TOPIC).inc()  # intake counts fetched records
    m.in_flight.set(1)  # permit taken ...
    m.free_permits.set(127)
    for stage in STAGES:  # processor: one histogram observation per stage
        m.observe_stage(stage, 0.01)
    m.records_predicted.labels("bench-out").inc()
    m.in_flight.set(0)  # ... and returned
    m.free_permits.set(128)
    if i % batch_size == 0:  # engine: once per batch
        m.batch_size.observe(batch_size)
        m.batch_fill_wait.observe(0.005)


def measure(
    records_per_s: float, batch_size: int, iterations: int = 20_000, scrape_interval_s: float = 15.0
) -> dict[str, Any]:
    metrics = Metrics()
    for i in range(1000):  # warm-up: label children created, caches hot
        per_record(metrics, batch_size, i)
    started = time.perf_counter()
    for i in range(iterations):
        per_record(metrics, batch_size, i)
    per_record_s = (time.perf_counter() - started) / iterations
    scrapes = 50
    started = time.perf_counter()
    for _ in range(scrapes):
        generate_latest(metrics.registry)
    scrape_s = (time.perf_counter() - started) / scrapes
    cores = os.cpu_count() or 1
    busy_per_s = per_record_s * records_per_s + scrape_s / scrape_interval_s
    return {
        "per_record_us": per_record_s * 1e6,
        "scrape_ms": scrape_s * 1000,
        "scrape_interval_s": scrape_interval_s,
        "records_per_s": records_per_s,
        "cpu_share_of_one_core": busy_per_s,
        "cpu_share_of_machine": busy_per_s / cores,
        "cores": cores,
    }
