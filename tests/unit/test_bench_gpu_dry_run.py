"""`make bench-gpu`'s stages run on the CPU (`--gpu --device cpu`): the same orchestration
the lent GPU machine runs, so a broken stage is found here and not in its 15 minutes."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from streamer.bench import report, runner
from streamer.bench.workload import BenchConfig
from streamer.vision.devices import installed

pytestmark = pytest.mark.timeout(240)


def test_the_gpu_run_checks_each_library_times_each_that_passed_and_needs_no_kafka(
    tmp_path: Path,
) -> None:
    libraries = (
        ("torchvision", "nvimgcodec") if installed("nvidia.nvimgcodec") else ("torchvision",)
    )
    config = BenchConfig.gpu(
        device="cpu",
        precision="fp32",
        bootstrap_servers="127.0.0.1:1",  # nothing listens there: no stage may use Kafka
        corpus_size=4,
        ceiling_batch_sizes=(4,),
        ceiling_min_s=0.2,
        max_batch_size=4,
        max_in_flight=16,
        decode_workers=1,
        engine_records=24,
        device_jpeg_libraries=libraries,
        stages=("device_check", "device_batch", "engine", "engine_in_flight", "engine_null"),
    )
    results = asyncio.run(runner.run(config, tmp_path))

    assert [lib for lib, c in results["device_check"].items() if c["passed"]] == list(libraries)
    assert set(results["device_batch"]["by_library"]) >= set(libraries)
    assert results["device_batch"]["resize_grouped_s"] > 0
    engine = results["engine"]
    assert set(engine["by_jpeg_library"]) == set(libraries)
    fastest = max(libraries, key=lambda lib: engine["by_jpeg_library"][lib]["images_per_s"])
    assert engine["jpeg_library"] == fastest
    assert engine["images_per_s"] == engine["by_jpeg_library"][fastest]["images_per_s"]
    in_flight = results["engine_in_flight"]
    assert in_flight["jpeg_library"] == fastest
    assert [r["batches_in_flight_per_device"] for r in in_flight["runs"]] == [3, 2]
    for run in (*engine["by_jpeg_library"].values(), *in_flight["runs"], results["engine_null"]):
        assert run["records"] == 24 and run["images_per_s"] > 0
        assert run["worker_busy_share"] > 0 and run["main_cpu_ms_per_record"] > 0
    report.write(results, tmp_path)
    summary = (tmp_path / "summary.md").read_text()
    assert "device check: torchvision | passed" in summary
    assert "host path without Kafka" in summary
    assert "by batches in flight per device | 3: " in summary
