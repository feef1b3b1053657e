"""The quick benchmark runs end to end against a real broker and reports every section.

Not a benchmark itself (no ``bench`` marker, so ``make test`` covers it): a tiny
corpus and short phases, asserting only that each section was measured and the
report files were written, so a broken stage fails CI instead of the next
full benchmark run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from streamer.bench import report, runner
from streamer.bench.workload import BenchConfig

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]


def tiny_config(bootstrap: str) -> BenchConfig:
    return BenchConfig.quick(
        bootstrap_servers=bootstrap,
        corpus_size=8,
        ceiling_batch_sizes=(1, 4),
        ceiling_min_s=0.2,
        max_batch_size=8,
        max_in_flight=16,
        engine_records=16,
        host_records=48,
        host_instances=2,
        e2e_records=24,
        naive_records=4,
        latency_s=4.0,
        latency_warmup_s=0.0,
        soak_s=4.0,
        soak_samples_s=(1.0, 4.0),
    )


async def topics_with_prefix(bootstrap: str, prefix: str) -> list[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        return sorted(n for n in await admin.list_topics() if n.startswith(prefix))
    finally:
        await admin.close()


async def test_quick_bench_reports_every_section(kafka_bootstrap: str, tmp_path: Path) -> None:
    results = await runner.run(tiny_config(kafka_bootstrap), tmp_path)
    paths = report.write(results, tmp_path)

    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["ceiling"]["images_per_s"] > 0
    assert all(v["forward_s"] > 0 for v in saved["ceiling"]["by_batch_size"].values())
    assert saved["engine"]["images_per_s"] > 0
    assert saved["e2e"]["images_per_s"] > 0 and saved["e2e"]["records"] == 24
    assert saved["e2e"]["steady"]["images_per_s"] > 0
    cold = saved["e2e"]
    assert cold["from_ready_s"] > 0
    assert cold["from_ready_images_per_s"] == pytest.approx(24 / cold["from_ready_s"])
    assert saved["naive"]["images_per_s"] > 0
    host = saved["host"]  # 48 records: too few for the bare loop's rate (one fetch, one ms)
    assert host["bare"]["records"] == 48 and host["bare"]["cpu_ms_per_record"] > 0
    assert host["service"]["records"] == 48 and host["service"]["exit_code"] == 0
    cores = os.cpu_count()
    assert cores is not None
    # The whole machine over each drain: 0 when it took under one clock tick (the bare
    # loop's), None when the service drained every record before it was ready.
    assert host["bare"]["machine_cpu_ms_per_record"] >= 0
    machine = host["service"]["machine_cpu_ms_per_record"]
    assert machine is None or machine >= 0
    several = host["instances"]  # two services, 24 records each, at once
    assert several["instances"] == 2 and several["exit_codes"] == [0, 0]
    # 24 records take a few ms: the two drains may not even overlap (then no rate).
    assert 0 <= several["overlap"] <= 1 and several["counted"] <= 48
    # None where an instance had drained all of its 24 records before both were ready.
    assert all(ms is None or ms >= 0 for ms in several["main_cpu_ms_per_record"])
    assert len(several["records_after_ready"]) == 2
    for fraction in ("0.5", "0.9"):
        phase = saved["latency"][fraction]
        assert phase["counted"] > 0
        assert 0 < phase["p50_s"] <= phase["p95_s"] <= phase["p99_s"]
        # Records were classified in the phase: the inference workers were busy some of it
        # (a share above 1 would mean the busy time is counted twice).
        assert 0 < phase["inference_busy"] <= 1.0
        assert 0 < phase["machine_busy_cores"] <= cores
    assert saved["service_memory"]["peak_rss_bytes"] > 0
    assert saved["service_memory"]["shm_reserved_bytes"] > 0
    assert saved["soak"]["checkpoints"][-1]["rss_bytes"] > 0
    assert saved["metrics_cost"]["per_record_us"] > 0
    # The host-path targets appear only when the run was long enough to measure them.
    assert set(saved["targets"]) - {"host_vs_bare", "host_main_cpu_ms_per_record"} == {
        "e2e_vs_ceiling",
        "e2e_steady_vs_ceiling",
        "e2e_cold_start_vs_ceiling",
        "e2e_vs_naive",
        "p99_at_half_peak",
        "rss_flat",
        "metrics_cost",
        "p99_with_target_at_0.9",
        "p99_with_target_at_0.5",
    }
    assert saved["latency_target"]["0.9"]["counted"] > 0
    assert 0 < saved["latency_target"]["0.9"]["inference_busy"] <= 1.0
    assert saved["latency_target"]["service_exit_code"] == 0
    assert saved["service_exit_code"] == 0
    names = {p.name for p in paths}
    # The run's topics held the corpus many times over: deleted at the end (--keep-topics).
    left = await topics_with_prefix(kafka_bootstrap, saved["prefix"])
    assert left == [], f"the run left its topics: {left}"
    assert {"results.json", "summary.md", "throughput.png", "latency_cdf.png"} <= names
    assert all(p.stat().st_size > 0 for p in paths)
