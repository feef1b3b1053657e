"""How much a decode process beside the model slows the model ceiling.

The engine stage runs decode workers and the inference worker on the same cores.
This experiment measures that cost on its own: the ceiling at one batch size
(``bench.ceiling``, the inference worker's threads), alone and then with a
separate process at the workers' nice value decoding the corpus at a fixed rate
beside it. Rounds alternate so that a machine whose speed drifts affects both.

    .venv/bin/python -m streamer.bench.contention --rate 44 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import time
from typing import Any

from streamer.bench.ceiling import run_ceiling
from streamer.bench.workload import payloads
from streamer.vision.decode import decode
from streamer.workers.child import WORKER_NICENESS


def paced_decode(rate: float, corpus_size: int, ready: Any, stop: Any, report: Any) -> None:
    """Decode the corpus at ``rate`` images/s from ``ready`` until ``stop``; put
    (images, seconds, CPU seconds) on ``report``."""
    os.nice(WORKER_NICENESS)
    images = payloads(corpus_size)
    decode(images[0])  # imports and first-call costs, outside the count
    started, cpu_started, done = time.perf_counter(), time.process_time(), 0
    ready.set()
    while not stop.is_set():
        delay = started + done / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        decode(images[done % len(images)])
        done += 1
    report.put((done, time.perf_counter() - started, time.process_time() - cpu_started))


def measure(
    rate: float, batch_size: int, threads: int, seconds: float, rounds: int, corpus_size: int = 64
) -> list[dict[str, float]]:
    context = multiprocessing.get_context("spawn")
    results = []
    for _ in range(rounds):
        alone = run_ceiling("random:0", "fp32", threads, (batch_size,), seconds)
        ready, stop, report = context.Event(), context.Event(), context.Queue()
        decoder = context.Process(
            target=paced_decode, args=(rate, corpus_size, ready, stop, report)
        )
        decoder.start()
        try:
            if not ready.wait(120):
                raise RuntimeError("the decode process did not start")
            # The decoder runs for the whole measurement, the model's load included.
            beside = run_ceiling("random:0", "fp32", threads, (batch_size,), seconds)
            stop.set()
            images, decode_s, cpu_s = report.get(timeout=60)
        finally:
            stop.set()
            decoder.join(timeout=60)
        results.append(
            {
                "alone_images_per_s": alone["images_per_s"],
                "beside_images_per_s": beside["images_per_s"],
                "ratio": beside["images_per_s"] / alone["images_per_s"],
                "decoded": float(images),
                "decode_cpu_ms_per_image": cpu_s / max(images, 1) * 1000,
                "decoded_per_s": images / decode_s,
            }
        )
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=44.0, help="decoded images per second")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--seconds", type=float, default=8.0, help="per ceiling measurement")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    for row in measure(args.rate, args.batch_size, args.threads, args.seconds, args.rounds):
        print(json.dumps(row))


if __name__ == "__main__":
    main()
