"""(b) The engine: encoded bytes in memory -> top-k, through the real workers, no Kafka.

Starts ``streamer.pipeline.engine.Engine`` in this process (shared-memory slots,
decode worker processes, batcher, inference worker process), warms it up with one
full batch, then classifies ``records`` payloads with at most ``max_in_flight``
in flight, as the service does, and times the whole run, this (the main)
process's CPU and how busy the inference worker was.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from streamer.config import Settings
from streamer.metrics import Metrics
from streamer.pipeline.engine import Engine


async def run_engine(settings: Settings, payloads: list[bytes], records: int) -> dict[str, Any]:
    """Throughput of ``records`` classifications (payloads cycled) and where their time went."""
    permits = asyncio.Semaphore(settings.max_in_flight)
    decode_s: list[float] = []
    batch_sizes: list[int] = []
    # Each record's share of its batch's time in the worker: summed, the worker's busy time.
    forward_shares: list[float] = []
    handled_shares: list[float] = []

    async def one(engine: Engine, payload: bytes) -> None:
        async with permits:
            result = await engine.classify(payload)
        decode_s.append(result.decode_s)
        batch_sizes.append(result.batch_size)
        forward_shares.append(result.forward_s / result.batch_size)
        handled_shares.append(result.handled_s / result.batch_size)

    async with Engine(settings, Metrics()) as engine:
        warmup = [payloads[i % len(payloads)] for i in range(settings.max_batch_size)]
        await asyncio.gather(*(one(engine, p) for p in warmup))
        for figures in (decode_s, batch_sizes, forward_shares, handled_shares):
            figures.clear()
        started = time.perf_counter()
        cpu_started = time.process_time()  # this process: the event loop and its threads
        await asyncio.gather(*(one(engine, payloads[i % len(payloads)]) for i in range(records)))
        elapsed = time.perf_counter() - started
        main_cpu_s = time.process_time() - cpu_started
    return {
        "records": records,
        "seconds": elapsed,
        "images_per_s": records / elapsed,
        "mean_decode_ms": 1000 * sum(decode_s) / len(decode_s),
        "mean_batch_size": sum(batch_sizes) / len(batch_sizes),
        "decode_workers": settings.decode_workers,
        "main_cpu_ms_per_record": 1000 * main_cpu_s / records,
        # The inference worker's busy share of the run: near 1, it is what limits the
        # engine; well under 1, what feeds it is.
        "worker_busy_share": sum(handled_shares) / elapsed,
        "worker_forward_share": sum(forward_shares) / elapsed,
    }
