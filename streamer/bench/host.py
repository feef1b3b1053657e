"""The host path: can one instance feed a GPU? The service with no model, against bare Kafka.

A GPU classifies thousands of images a second, so what limits an instance there
is everything around the model: Kafka I/O, the event loop's per-record work,
shared memory, the worker pipes, batching. This stage measures that alone, on
this machine, in one run:

1. **bare**: ``streamer.bench.bare`` (consume, answer each record with a small
   JSON, idempotent ``acks=all``, commit) drains the pre-loaded input topic: the
   records/s and CPU per record of Kafka I/O with nothing else.
2. **service**: ``streamer run --weights null --null-decode`` drains the same
   records: the inference worker returns fixed scores without computing and the
   decode workers answer at once, so what is measured is the host path (with one
   inference thread: the model does nothing, and on a small machine a second
   OpenMP thread stalls every batch at its barriers; see docs/BENCHMARKS.md). Its
   main process's CPU per record (from ``/proc/<pid>/stat``, counted from the
   moment it is ready, over the records predicted since) is the event loop's cost.

The targets (issue 11): the service >= 0.8x the bare loop's records/s, and its
main process <= 0.2 ms CPU per record at that rate.

With ``profile_host`` both drains are also sampled with py-spy and split into
Kafka client, record reading, own code and event loop (``streamer.bench.host_profile``).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

from streamer.bench import host_profile
from streamer.bench.e2e import measure_drain
from streamer.bench.kafka_io import make_topics, preload, read_outputs, throughput
from streamer.bench.scale import predicted_total
from streamer.bench.service import ChildProcess, ServiceProcess, scrape_metrics
from streamer.bench.workload import BenchConfig, free_port, service_settings

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of one process (its threads, not its children)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime


async def run_host(
    config: BenchConfig, corpus: list[bytes], prefix: str, results_dir: Path
) -> dict[str, Any]:
    options = {"bootstrap_servers": config.bootstrap_servers}
    records = config.host_records
    topics = {name: f"{prefix}-host-{name}" for name in ("in", "dlq", "bare-out", "out")}
    await make_topics(
        options,
        [topics["in"], topics["dlq"]],
        [topics["bare-out"], topics["out"]],
        config.partitions,
    )
    await preload(options, topics["in"], corpus, records)
    profile = config.profile_host
    if profile:
        host_profile.py_spy()  # before any work: a missing py-spy fails at once
    bare = await _run_bare(
        options, topics, f"{prefix}-host-bare", records, results_dir, profile=profile
    )
    settings = service_settings(
        config,
        f"{prefix}-host",
        input_topic=topics["in"],
        output_topic=topics["out"],
        dlq_topic=topics["dlq"],
        weights="null",
        null_decode=True,
        # The null model computes nothing: a second intra-op thread only waits at
        # barriers for a thread the main process preempted (10x slower measured).
        inference_threads=1,
        # One inference process, as on one GPU: the host path feeds it.
        cpu_inference_workers=1,
        # Batches as large as on a GPU: the null model's time grows with the batch
        # (top-k per row), so its table would choose small batches a GPU would not.
        batch_size_from_table=False,
        metrics_port=free_port(),
    )
    service = ServiceProcess(settings, results_dir / "host-service.log")
    service.start()
    sampler: host_profile.Sampler | None = None
    raw: str | None = None
    try:
        await service.wait_ready()
        predicted_at_ready = predicted_total(
            await asyncio.to_thread(scrape_metrics, settings), topics["out"]
        )
        cpu_at_ready = process_cpu_s(service.pid)
        sampler = (
            host_profile.Sampler(service.pid, results_dir / "host-service-profile.txt")
            if profile
            else None
        )
        drained = await measure_drain(
            service,
            options,
            topics["out"],
            records,
            skip=settings.max_batch_size,
            timeout_s=max(300.0, records * 0.5),
        )
        main_cpu_s = process_cpu_s(service.pid) - cpu_at_ready
        raw = await sampler.stop() if sampler is not None else None
    finally:
        if sampler is not None:
            sampler.kill()
        exit_code = await asyncio.to_thread(service.stop)
    counted = records - predicted_at_ready
    service_result = {
        **drained,
        "main_cpu_s": main_cpu_s,
        "records_after_ready": counted,
        "main_cpu_ms_per_record": 1000 * main_cpu_s / counted if counted > 0 else None,
        "exit_code": exit_code,
    }
    if raw is not None:
        service_result["profile"] = host_profile.split(
            raw, service_result["main_cpu_ms_per_record"]
        )
    return {
        "records": records,
        "bare": bare,
        "service": service_result,
        "service_vs_bare": (
            drained["images_per_s"] / bare["images_per_s"] if bare["images_per_s"] else None
        ),
    }


async def _run_bare(
    options: dict[str, Any],
    topics: dict[str, str],
    group: str,
    records: int,
    results_dir: Path,
    profile: bool = False,
) -> dict[str, Any]:
    log_path = results_dir / "host-bare.log"
    argv = [
        sys.executable, "-m", "streamer.bench.bare",
        "--bootstrap-servers", options["bootstrap_servers"],
        "--input-topic", topics["in"],
        "--output-topic", topics["bare-out"],
        "--group-id", group,
        "--records", str(records),
    ]  # fmt: skip
    bare = ChildProcess(argv, dict(os.environ), log_path)
    bare.start()
    assert bare.process is not None
    sampler = (
        host_profile.Sampler(bare.process.pid, results_dir / "host-bare-profile.txt")
        if profile
        else None
    )
    try:
        # It exits once it has answered ``records`` records (and flushed them).
        code = await asyncio.to_thread(bare.process.wait, max(300.0, records * 0.5))
        if code != 0:
            raise RuntimeError(f"the bare loop exited with {code}: {log_path.read_text()[-2000:]}")
        # py-spy writes its samples when the process it sampled exits.
        raw = await sampler.stop() if sampler is not None else None
    finally:
        bare.stop(timeout_s=10)
        if sampler is not None:
            sampler.kill()
    outputs = (await read_outputs(options, topics["bare-out"]))[:records]
    result: dict[str, Any] = throughput(outputs, skip=0)
    usage = json.loads(log_path.read_text().strip().splitlines()[-1])
    result["cpu_s"] = usage["cpu_s"]
    result["cpu_ms_per_record"] = 1000 * usage["cpu_s"] / usage["records"]
    if raw is not None:
        result["profile"] = host_profile.split(raw, result["cpu_ms_per_record"])
    return result
