"""``streamer bench``: measure ceiling, engine, end-to-end, naive baseline, latency and memory.

Writes ``results.json``, PNG plots and ``summary.md`` to ``--results`` (default
``results/bench-<timestamp>``). Needs a Kafka broker; topics are fresh per run,
and the ``bench`` extra (psutil, matplotlib, scikit-image).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from pathlib import Path
from typing import Any

from streamer import logs
from streamer.tools.errors import one_line_errors, require_extra

# What the bench extra installs, by import name: process figures, plots, the corpus.
BENCH_MODULES = ("psutil", "matplotlib", "skimage")


def add_parser(commands: Any) -> None:
    parser = commands.add_parser("bench", help="run the benchmarks (see docs/BENCHMARKS.md)")
    parser.add_argument("--quick", action="store_true", help="small corpus, short phases and soak")
    parser.add_argument(
        "--gpu",
        action="store_true",
        help="the accelerator check: ceiling and engine on CUDA, fp16, no Kafka (make bench-gpu)",
    )
    parser.add_argument("--results", type=Path, default=None, help="results folder")
    parser.add_argument("--skip-soak", action="store_true", help="leave out the RSS soak")
    parser.add_argument(
        "--keep-topics",
        action="store_true",
        help="keep the run's topics (default: deleted at the end; they hold the corpus many"
        " times over)",
    )
    parser.add_argument("--bootstrap-servers", default="127.0.0.1:9092")
    parser.add_argument(
        "--device",
        default=None,
        help="the inference device (default cpu; --gpu: cuda); --gpu --device cpu runs the GPU"
        " run's stages on the CPU, a dry run",
    )
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default=None)
    parser.add_argument("--max-batch-size", type=int, default=None)
    parser.add_argument("--max-batch-delay-ms", type=float, default=None)
    parser.add_argument("--max-in-flight", type=int, default=None)
    parser.add_argument(
        "--batches-in-flight",
        dest="batches_in_flight_per_device",
        type=int,
        default=None,
        help="inference batches sent to each device before the first returns (default 2)",
    )
    parser.add_argument("--decode-workers", type=int, default=None)
    parser.add_argument("--inference-threads", type=int, default=None)
    parser.add_argument(
        "--cpu-inference-workers",
        type=int,
        default=None,
        help="inference worker processes on the CPU, sharing its cores"
        " (default: the service's, 2 on two or more cores)",
    )
    parser.add_argument("--engine-records", type=int, default=None)
    parser.add_argument("--e2e-records", type=int, default=None)
    parser.add_argument("--naive-records", type=int, default=None)
    parser.add_argument(
        "--host-records", type=int, default=None, help="records of the host-path stage"
    )
    parser.add_argument(
        "--host-instances",
        type=int,
        default=None,
        help="the host stage also runs this many null-model services at once, each draining"
        " host-records / N of its own (default 1: only the one)",
    )
    parser.add_argument(
        "--profile-host",
        action="store_true",
        help="sample the host stage's bare loop and service with py-spy and split their CPU"
        " (needs ptrace permission)",
    )
    parser.add_argument("--latency-s", type=float, default=None, help="seconds per latency phase")
    parser.add_argument("--soak-s", type=float, default=None, help="soak duration (full: 600)")
    parser.add_argument(
        "--stages",
        default=None,
        help="comma-separated subset of ceiling,engine,host,naive,e2e,latency,soak (default:"
        " all), or scale; --gpu runs device_check,device_batch,ceiling,engine,"
        "engine_in_flight,engine_null",
    )
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument(
        "--service-log-level",
        default=None,
        help="the services' log level (default WARNING; DEBUG logs each correction of the"
        " latency-target policy in service-target.log)",
    )
    parser.set_defaults(func=_main)


def config_from_args(args: argparse.Namespace) -> Any:
    from streamer.bench.workload import BenchConfig

    overrides: dict[str, Any] = {"bootstrap_servers": args.bootstrap_servers}
    if args.skip_soak:
        overrides["skip_soak"] = True
    if args.keep_topics:
        overrides["keep_topics"] = True
    if args.profile_host:
        overrides["profile_host"] = True
    for name in (
        "device",
        "precision",
        "max_batch_size",
        "max_batch_delay_ms",
        "max_in_flight",
        "batches_in_flight_per_device",
        "decode_workers",
        "inference_threads",
        "cpu_inference_workers",
        "engine_records",
        "e2e_records",
        "naive_records",
        "host_records",
        "host_instances",
        "latency_s",
        "soak_s",
        "service_log_level",
    ):
        value = getattr(args, name)
        if value is not None:
            overrides[name] = value
    if args.stages:
        overrides["stages"] = tuple(x.strip() for x in args.stages.split(",") if x.strip())
    if args.soak_s is not None:
        overrides["soak_samples_s"] = (min(120.0, args.soak_s / 5), args.soak_s)
    if args.gpu:
        return BenchConfig.gpu(**overrides)
    return BenchConfig.quick(**overrides) if args.quick else BenchConfig.full(**overrides)


@one_line_errors("bench", quiet_client_logs=False)
def _main(args: argparse.Namespace) -> int:
    require_extra("bench", "bench", BENCH_MODULES)
    from streamer.bench import report, runner  # imports torch and matplotlib: only here

    logs.configure(args.log_level)
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    try:
        config = config_from_args(args)
    except ValueError as exc:
        print(f"streamer bench: {exc}", file=sys.stderr)
        return 2
    directory = args.results or Path("results") / f"bench-{time.strftime('%Y%m%d-%H%M%S')}"
    results = asyncio.run(runner.run(config, directory))
    for path in report.write(results, directory):
        print(f"wrote {path}")
    print((directory / "summary.md").read_text())
    return 0
