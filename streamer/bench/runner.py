"""Run every benchmark stage in order on this machine and collect one result dict.

Order: (a) ceiling and (b) engine in this process; the host path (bare aiokafka
loop, then the service with the null model, on their own topics); then fresh topics, the input
pre-loaded once; (d) the naive baseline drains the first records; then the
service starts as a subprocess and (c) drains the whole backlog, followed by the
steady-rate latency phases and the RSS soak on the same running service; last,
the metrics cost and (a) once more (per batch size the faster sweep counts).
Nothing else the benchmark starts runs during a measurement; other work on the
machine shows in the 1-minute load average kept after each phase.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import psutil
import torch

from streamer.bench import gpu, metrics_cost
from streamer.bench.agreement import agreement
from streamer.bench.ceiling import best_of, run_ceiling_workers
from streamer.bench.device_batch import DEVICE_BATCH_STAGE, breakdown
from streamer.bench.e2e import run_naive, run_service_throughput
from streamer.bench.engine import run_engine
from streamer.bench.host import run_host
from streamer.bench.kafka_io import make_topics, preload, wait_for_count
from streamer.bench.latency import run_latency
from streamer.bench.scale import run_scale
from streamer.bench.service import MemorySampler, ServiceProcess
from streamer.bench.soak import run_soak
from streamer.bench.targets import verdicts
from streamer.bench.workload import (
    SCALE_STAGE,
    BenchConfig,
    free_port,
    inference_threads,
    inference_workers,
    payloads,
    run_prefix,
    service_settings,
)
from streamer.config import Settings
from streamer.tools.admin import delete_topics_with_prefix
from streamer.vision.devices import cuda_device_count, resolve_devices

log = logging.getLogger(__name__)


def machine() -> dict[str, Any]:
    model = ""
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        model = next(
            (
                ln.split(":", 1)[1].strip()
                for ln in lscpu.splitlines()
                if ln.startswith("Model name")
            ),
            "",
        )
    except (OSError, subprocess.SubprocessError):
        pass
    return {
        "cpu_model": model or platform.processor(),
        "cores": os.cpu_count(),
        "ram_bytes": psutil.virtual_memory().total,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "load_average_at_start": os.getloadavg(),
    }


# The stages that create topics (latency and soak run on e2e's).
KAFKA_STAGES = frozenset({"host", "naive", "e2e", SCALE_STAGE})


async def run(config: BenchConfig, results_dir: Path) -> dict[str, Any]:
    """Every stage of ``config``; then, unless ``keep_topics``, delete the run's topics.

    Each run's topics (named ``bench-<time>-<id>-...``) hold its whole corpus several
    times over: a few runs would fill a developer's disk if they stayed.
    """
    prefix = run_prefix()
    try:
        return await _run(config, results_dir, prefix)
    finally:
        if not config.keep_topics and KAFKA_STAGES & set(config.stages):
            await _delete_topics(config, prefix)


async def _delete_topics(config: BenchConfig, prefix: str) -> None:
    try:
        names = await delete_topics_with_prefix(
            {"bootstrap_servers": config.bootstrap_servers}, prefix
        )
    except Exception as exc:  # the figures are measured already: say so, keep them
        log.warning("bench: could not delete the topics %s-*: %r", prefix, exc)
    else:
        log.info("bench: deleted %d topics %s-* (--keep-topics keeps them)", len(names), prefix)


async def _run(config: BenchConfig, results_dir: Path, prefix: str) -> dict[str, Any]:
    await asyncio.to_thread(results_dir.mkdir, parents=True, exist_ok=True)
    settings = service_settings(config, prefix, metrics_port=free_port())
    threads = inference_threads(settings)
    # The ceiling's layout: the CPU inference workers (one per device on CUDA, whose
    # ceiling is one device's).
    workers = inference_workers(settings) if settings_device(settings) == "cpu" else 1
    corpus = payloads(config.corpus_size, sizes=config.corpus_sizes)
    batch_sizes = tuple(sorted({*config.ceiling_batch_sizes, config.max_batch_size}))
    results: dict[str, Any] = {
        "machine": machine(),
        "config": dataclasses.asdict(config),
        "prefix": settings.group_id,
        "service_settings": settings.model_dump(mode="json", exclude={"sasl_password"}),
        "corpus": {
            "images": len(corpus),
            "mean_bytes": sum(map(len, corpus)) / len(corpus),
            "sizes": "500x375 and 224x224 JPEG (real photos, then synthetic fill)",
        },
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    stages = set(config.stages)

    def sweep_ceiling() -> dict[str, Any]:
        """The service's layout of inference workers and, when it runs several on the
        CPU, one worker on every core as well: per batch size the faster of the two."""
        layouts = {(workers, threads)} | ({(1, os.cpu_count() or 1)} if workers > 1 else set())
        device = settings_device(settings)
        sweeps = [
            run_ceiling_workers(
                w, config.weights, config.precision, t, batch_sizes, config.ceiling_min_s, device
            )
            for w, t in sorted(layouts, reverse=True)
        ]
        return best_of(sweeps)

    libraries: list[str] | None = None  # device-checked JPEG libraries: engine runs each
    if "device_check" in stages:
        # First: no figure of a decoder that gives other answers (bench.gpu); fatal when
        # no library passes.
        results["device_check"], libraries = gpu.check_libraries(
            config.device_jpeg_libraries, corpus, settings_device(settings), config.weights
        )
    if DEVICE_BATCH_STAGE in stages:
        log.info("bench: one batch's steps on the device, timed one by one")
        results[DEVICE_BATCH_STAGE] = breakdown(
            corpus, settings_device(settings), libraries or ["torchvision"],
            config.max_batch_size, config.weights, config.precision,
        )  # fmt: skip
    if "ceiling" in stages:
        log.info(
            "bench (a) ceiling batch_sizes=%s workers=%d threads=%d", batch_sizes, workers, threads
        )
        results["ceiling"] = sweep_ceiling()
        results["ceiling"]["load_average_after"] = os.getloadavg()
        if config.precision != "fp32":
            results["ceiling"]["agreement_with_fp32"] = agreement(
                config.weights, config.precision, corpus, settings_device(settings)
            )
    if "engine" in stages:
        log.info("bench (b) engine records=%d", config.engine_records)
        results["engine"] = await (
            run_engine(settings, corpus, config.engine_records)
            if libraries is None
            else gpu.engine_by_library(settings, corpus, config.engine_records, libraries)
        )
        results["engine"]["load_average_after"] = os.getloadavg()
    if gpu.IN_FLIGHT_STAGE in stages and "engine" in results:
        library = results["engine"].get("jpeg_library", settings.device_jpeg_library)
        results[gpu.IN_FLIGHT_STAGE] = await gpu.one_more_batch_in_flight(
            settings, corpus, config.engine_records, library
        )
    if gpu.NULL_ENGINE_STAGE in stages:
        log.info("bench host path without Kafka: the engine with the null model")
        results[gpu.NULL_ENGINE_STAGE] = await run_engine(
            gpu.null_engine_settings(settings), corpus, config.engine_records
        )
    if "host" in stages:
        log.info("bench host path records=%d", config.host_records)
        results["host"] = await run_host(config, corpus, settings.group_id, results_dir)
        results["host"]["load_average_after"] = os.getloadavg()
    if stages & {"naive", "e2e"}:
        await _kafka_stages(config, settings, corpus, stages, results, results_dir)
    if SCALE_STAGE in stages:
        results["scale"] = await run_scale(config, corpus, settings.group_id, results_dir)
    if "ceiling" in stages and config.ceiling_again_at_end:
        log.info("bench (a) ceiling again, at the end of the run")
        again = sweep_ceiling()
        again["load_average_after"] = os.getloadavg()
        results["ceiling"] = best_of([results["ceiling"], again])
    results["machine"]["load_average_at_end"] = os.getloadavg()
    results["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    results["targets"] = verdicts(results)
    return results


async def _kafka_stages(
    config: BenchConfig,
    settings: Settings,
    corpus: list[bytes],
    stages: set[str],
    results: dict[str, Any],
    results_dir: Path,
) -> None:
    """(d), then (c), latency and soak on one running service."""
    prefix = settings.group_id
    options = {"bootstrap_servers": config.bootstrap_servers}

    input_topic, output_topic = settings.input_topic, settings.output_topic
    naive_out = f"{prefix}-naive-out"
    await make_topics(
        options, [input_topic, settings.dlq_topic], [output_topic, naive_out], config.partitions
    )
    await preload(options, input_topic, corpus, config.e2e_records)
    if "naive" in stages:
        log.info("bench (d) naive records=%d", config.naive_records)
        results["naive"] = await run_naive(
            options,
            input_topic,
            naive_out,
            f"{prefix}-naive",
            config.weights,
            config.naive_records,
            results_dir / "naive.log",
        )
        results["naive"]["load_average_after"] = os.getloadavg()
    if "e2e" not in stages:
        return

    service = ServiceProcess(settings, results_dir / "service.log")
    service.start()
    sampler = MemorySampler(service.pid)
    await sampler.start()
    try:
        ready_s = await service.wait_ready()
        ready_at = time.time()
        log.info("bench (c) end to end records=%d", config.e2e_records)
        results["e2e"] = await run_service_throughput(
            service, sampler, options, config.e2e_records, ready_at
        )
        results["e2e"]["ready_s"] = ready_s
        results["e2e"]["load_average_after"] = os.getloadavg()
        peak = results["e2e"]["images_per_s"]
        produced = config.e2e_records
        results["latency"] = {}
        for fraction in config.latency_fractions if "latency" in stages else ():
            log.info("bench latency at %.0f%% of %.2f/s", fraction * 100, peak)
            phase = await run_latency(
                service,
                sampler,
                options,
                corpus,
                fraction * peak,
                config.latency_s,
                config.latency_warmup_s,
                produced,
            )
            produced = phase["produced_total"]
            phase["load_average_after"] = os.getloadavg()
            results["latency"][f"{fraction:g}"] = phase
        if "soak" in stages and not config.skip_soak:
            log.info(
                "bench soak %.0f s at %.0f%% of peak", config.soak_s, config.soak_fraction * 100
            )
            results["soak"] = await run_soak(
                service,
                sampler,
                options,
                corpus,
                config.soak_fraction * peak,
                config.soak_s,
                config.soak_samples_s,
                produced,
            )
        results["service_memory"] = sampler.summary()
        results["memory_series"] = [dataclasses.asdict(s) for s in sampler.samples]
    finally:
        await sampler.stop()
        results["service_exit_code"] = await asyncio.to_thread(service.stop)
    if "latency" in stages and config.latency_target_ms is not None:
        results["latency_target"] = await _latency_with_target(
            config, corpus, f"{prefix}-target", results["e2e"]["images_per_s"], results_dir
        )
    results["metrics_cost"] = metrics_cost.measure(
        results["e2e"]["images_per_s"], config.max_batch_size
    )


async def _latency_with_target(
    config: BenchConfig, corpus: list[bytes], prefix: str, peak: float, results_dir: Path
) -> dict[str, Any]:
    """The latency phases again, at the same rates, on a service with ``latency_target_ms``
    (its own topics and group). Like the first service, it first drains a backlog of
    ``e2e_records``, so both are equally warm (every batch size seen, the batch-time
    table filled) when the phases start."""
    assert config.latency_target_ms is not None
    settings = service_settings(
        config,
        prefix,
        metrics_port=free_port(),
        latency_target_ms=config.latency_target_ms,
    )
    options = {"bootstrap_servers": config.bootstrap_servers}
    await make_topics(
        options,
        [settings.input_topic, settings.dlq_topic],
        [settings.output_topic],
        config.partitions,
    )
    await preload(options, settings.input_topic, corpus, config.e2e_records)
    service = ServiceProcess(settings, results_dir / "service-target.log")
    service.start()
    sampler = MemorySampler(service.pid)
    await sampler.start()
    phases: dict[str, Any] = {"target_ms": config.latency_target_ms}
    try:
        await service.wait_ready()
        await wait_for_count(
            options, settings.output_topic, config.e2e_records, 600.0, check=service.check_alive
        )
        produced = config.e2e_records
        for fraction in config.latency_fractions:
            log.info(
                "bench latency with a %.0f ms target at %.0f%% of %.2f/s",
                config.latency_target_ms,
                fraction * 100,
                peak,
            )
            phase = await run_latency(
                service, sampler, options, corpus, fraction * peak,
                config.latency_s, config.latency_warmup_s, produced,
            )  # fmt: skip
            produced = phase["produced_total"]
            phase["load_average_after"] = os.getloadavg()
            phases[f"{fraction:g}"] = phase
    finally:
        await sampler.stop()
        phases["service_exit_code"] = await asyncio.to_thread(service.stop)
    return phases


def settings_device(settings: Settings) -> str:
    """The device the engine's (first) inference worker uses, for the ceiling to match."""
    return resolve_devices(settings.device, cuda_device_count())[0]
