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

Both sides also report the whole machine's busy CPU per record over their drain
(``/proc/stat``: the broker and the workers run on the same cores). The machine's
cores over it bound what the host path can reach here, however many event loops
share them; one event loop is bounded by its own core.

The targets (issue 11): the service >= 0.8x the bare loop's records/s, and its
main process <= 0.2 ms CPU per record at that rate.

With ``profile_host`` both drains are also sampled with py-spy and split into
Kafka client, record reading, own code and event loop (``streamer.bench.host_profile``).

With ``host_instances`` n > 1, n services then drain at the same time, each its
own input topic of ``host_records / n`` records and its own group (so no rebalance
falls inside the drain): how much one machine's host path gives when one event
loop is not enough (docs/SCALING.md, "Feeding one GPU", way 1). Their rate
together is counted only while all n are draining (``together``).
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
from streamer.bench.kafka_io import (
    make_topics,
    preload,
    read_outputs,
    throughput,
    wait_for_count,
)
from streamer.bench.scale import predicted_total
from streamer.bench.service import (
    CLOCK_TICKS,
    ChildProcess,
    MachineCpu,
    ServiceProcess,
    scrape_metrics,
)
from streamer.bench.workload import BenchConfig, free_port, service_settings
from streamer.config import Settings


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
    settings = _null_service(config, f"{prefix}-host", topics["in"], topics["out"], topics["dlq"])
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
        machine_at_ready = MachineCpu.now()
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
        machine_cpu_s = MachineCpu.now().busy_s - machine_at_ready.busy_s
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
        # From ready to the last prediction: the broker and the workers are in it too.
        "machine_cpu_ms_per_record": 1000 * machine_cpu_s / counted if counted > 0 else None,
        "exit_code": exit_code,
    }
    if raw is not None:
        service_result["profile"] = host_profile.split(
            raw, service_result["main_cpu_ms_per_record"]
        )
    result = {
        "records": records,
        "bare": bare,
        "service": service_result,
        "service_vs_bare": (
            drained["images_per_s"] / bare["images_per_s"] if bare["images_per_s"] else None
        ),
    }
    if config.host_instances > 1:
        several = await _run_instances(
            config, corpus, f"{prefix}-host{config.host_instances}", results_dir
        )
        several["together_vs_bare"] = (
            several["images_per_s"] / bare["images_per_s"] if bare["images_per_s"] else None
        )
        result["instances"] = several
    return result


def _null_service(
    config: BenchConfig, name: str, input_topic: str, output_topic: str, dlq_topic: str
) -> Settings:
    """A service with the null model and decode: its host path alone."""
    return service_settings(
        config,
        name,
        input_topic=input_topic,
        output_topic=output_topic,
        dlq_topic=dlq_topic,
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


async def _run_instances(
    config: BenchConfig, corpus: list[bytes], prefix: str, results_dir: Path
) -> dict[str, Any]:
    """``host_instances`` services with the null model drain their own topics at once."""
    options = {"bootstrap_servers": config.bootstrap_servers}
    n = config.host_instances
    each = config.host_records // n
    fleet = []
    for i in range(n):
        name = f"{prefix}-{i}"
        await make_topics(
            options, [f"{name}-in", f"{name}-dlq"], [f"{name}-out"], config.partitions
        )
        await preload(options, f"{name}-in", corpus, each)
        fleet.append(_null_service(config, name, f"{name}-in", f"{name}-out", f"{name}-dlq"))
    services = [
        ServiceProcess(s, results_dir / f"host-service-{n}x-{i}.log") for i, s in enumerate(fleet)
    ]
    try:
        for service in services:
            service.start()
        await asyncio.gather(*(service.wait_ready() for service in services))
        # Counted from here: each may have drained for a while before all were ready.
        predicted_at_ready = [
            predicted_total(await asyncio.to_thread(scrape_metrics, s), s.output_topic)
            for s in fleet
        ]
        cpu_at_ready = [process_cpu_s(service.pid) for service in services]
        machine_at_ready = MachineCpu.now()
        await asyncio.gather(
            *(
                wait_for_count(
                    options, s.output_topic, each, max(300.0, each * 0.5), check=service.check_alive
                )
                for s, service in zip(fleet, services, strict=True)
            )
        )
        main_cpu_s = [
            process_cpu_s(service.pid) - cpu
            for service, cpu in zip(services, cpu_at_ready, strict=True)
        ]
        machine_cpu_s = MachineCpu.now().busy_s - machine_at_ready.busy_s
    finally:
        exit_codes = await asyncio.gather(*(asyncio.to_thread(s.stop) for s in services))
    outputs = [(await read_outputs(options, s.output_topic))[:each] for s in fleet]
    counted = [each - predicted for predicted in predicted_at_ready]
    return {
        "instances": n,
        "records_each": each,
        **together([[o.appended_ms / 1000 for o in out] for out in outputs]),
        # From all being ready to the last prediction, over the records predicted since.
        "records_after_ready": counted,
        "main_cpu_ms_per_record": [
            1000 * cpu / c if c > 0 else None for cpu, c in zip(main_cpu_s, counted, strict=True)
        ],
        "machine_cpu_ms_per_record": (
            1000 * machine_cpu_s / sum(counted) if sum(counted) > 0 else None
        ),
        "exit_codes": exit_codes,
    }


def together(append_s: list[list[float]]) -> dict[str, float]:
    """The rate of several drains together, counted only while all of them ran: from
    the latest first append to the earliest last one, every drain's appends in it.

    ``append_s``: each drain's append times (seconds), in any order.
    """
    starts = [min(times) for times in append_s]
    ends = [max(times) for times in append_s]
    start, end = max(starts), min(ends)
    span = max(0.0, end - start)  # 0: one drain ended before another began
    counted = sum(1 for times in append_s for t in times if start < t <= end)
    whole = max(ends) - min(starts)
    return {
        "seconds": span,
        "counted": float(counted),
        "images_per_s": counted / span if span > 0 else 0.0,
        # How much of the drains the window holds (1: they ran exactly together).
        "overlap": span / whole if whole > 0 else 0.0,
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
    result["machine_cpu_ms_per_record"] = 1000 * usage["machine_cpu_s"] / usage["records"]
    if raw is not None:
        result["profile"] = host_profile.split(raw, result["cpu_ms_per_record"])
    return result
