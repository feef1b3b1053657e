"""Kafka side of the benchmark: fresh topics, pre-loading, steady-rate producing, reading back.

Output topics are created with ``message.timestamp.type=LogAppendTime``: the
broker stamps each prediction when it appends it, which (acks=all, one broker)
is the moment before it acks the write. Input records keep ``CreateTime``, set
by the benchmark's producer when it sends them. Both clocks are this machine's.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.structs import TopicPartition

from streamer.tools.admin import create_topics
from streamer.tools.consume import read_records

MAX_REQUEST_BYTES = 8 * 1024 * 1024


async def make_topics(
    options: dict[str, Any], inputs: list[str], outputs: list[str], partitions: int
) -> None:
    """Create the topics; outputs get broker append timestamps."""
    await create_topics(options, inputs + outputs, partitions)
    admin = AIOKafkaAdminClient(**options)
    await admin.start()
    try:
        await admin.alter_configs(
            [
                ConfigResource(
                    ConfigResourceType.TOPIC, name, {"message.timestamp.type": "LogAppendTime"}
                )
                for name in outputs
            ]
        )
    finally:
        await admin.close()


def _producer(options: dict[str, Any], linger_ms: int) -> AIOKafkaProducer:
    return AIOKafkaProducer(
        acks="all", linger_ms=linger_ms, max_request_size=MAX_REQUEST_BYTES, **options
    )


async def preload(options: dict[str, Any], topic: str, payloads: list[bytes], count: int) -> None:
    """Write ``count`` records (payloads cycled) as fast as the broker takes them."""
    producer = _producer(options, linger_ms=20)
    await producer.start()
    try:
        futures = [
            await producer.send(topic, payloads[i % len(payloads)], key=str(i).encode())
            for i in range(count)
        ]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


@dataclass(frozen=True)
class PacedRun:
    sent: int
    first_ms: int  # CreateTime of the first record
    last_ms: int
    achieved_per_s: float


async def produce_paced(
    options: dict[str, Any], topic: str, payloads: list[bytes], rate_per_s: float, duration_s: float
) -> PacedRun:
    """Send ``rate_per_s`` records per second for ``duration_s``, on a fixed schedule.

    Record ``i`` is due at ``start + i / rate``; a late send is not made up by a
    burst beyond the schedule, so the offered load stays steady.
    """
    producer = _producer(options, linger_ms=0)
    await producer.start()
    loop = asyncio.get_running_loop()
    futures = []
    first_ms = last_ms = 0
    try:
        start = loop.time()
        total = max(1, int(rate_per_s * duration_s))
        for i in range(total):
            delay = start + i / rate_per_s - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            now_ms = int(time.time() * 1000)
            first_ms = first_ms or now_ms
            last_ms = now_ms
            futures.append(
                await producer.send(
                    topic, payloads[i % len(payloads)], key=str(i).encode(), timestamp_ms=now_ms
                )
            )
        await asyncio.gather(*futures)
        elapsed = loop.time() - start
    finally:
        await producer.stop()
    return PacedRun(len(futures), first_ms, last_ms, len(futures) / max(elapsed, 1e-9))


async def partitions_of(consumer: AIOKafkaConsumer, topic: str) -> set[int]:
    """The topic's partitions, from fresh metadata (the consumer subscribes to nothing)."""
    client = consumer._client  # aiokafka has no public "refresh metadata" on the consumer
    await client.force_metadata_update()
    return set(client.cluster.partitions_for_topic(topic) or ())


async def _size(consumer: AIOKafkaConsumer, topic: str) -> int:
    """Records in ``topic`` (sum of end offsets; nothing is deleted during a run)."""
    partitions = await partitions_of(consumer, topic)
    ends = await consumer.end_offsets([TopicPartition(topic, p) for p in partitions])
    return sum(ends.values())


async def wait_for_count(
    options: dict[str, Any],
    topic: str,
    count: int,
    timeout_s: float,
    check: Callable[[], None] = lambda: None,
    interval_s: float = 1.0,
) -> float:
    """Wait until ``topic`` holds ``count`` records; return the monotonic time it did."""
    deadline = time.monotonic() + timeout_s
    consumer = AIOKafkaConsumer(**options)
    await consumer.start()
    try:
        while True:
            check()
            have = await _size(consumer, topic)
            if have >= count:
                return time.monotonic()
            if time.monotonic() > deadline:
                raise TimeoutError(f"{topic}: {have} of {count} records after {timeout_s} s")
            await asyncio.sleep(interval_s)
    finally:
        await consumer.stop()


@dataclass(frozen=True)
class Output:
    appended_ms: int  # broker append time of the prediction
    source_ms: int  # CreateTime of the input record it answers
    batch_size: int
    forward_ms: float | None = None  # its batch's forward pass (timings), when written


def forward_ms_by_batch_size(outputs: list[Output]) -> dict[int, dict[str, float]]:
    """Per batch size: how many batches, and their median forward pass in ms.

    Every record of a batch carries the batch's time, so each batch counts once
    whatever its size. The same size runs slower when records arrive one by one than
    in a drain (docs/BENCHMARKS.md, run Q): the steady phases and the drain show it.
    """
    by_size: dict[int, list[float]] = {}
    for o in outputs:
        if o.forward_ms is not None:
            by_size.setdefault(o.batch_size, []).append(o.forward_ms)
    return {
        size: {"batches": len(times) / size, "median_ms": statistics.median(times)}
        for size, times in sorted(by_size.items())
    }


async def read_outputs(options: dict[str, Any], topic: str) -> list[Output]:
    """Every prediction in ``topic`` with its append time and its input's timestamp.

    The batch size is in a prediction only when the service runs with
    ``include_timings`` (``workload.service_settings`` sets it; the naive baseline
    always writes 1).
    """
    outputs = []
    async for record in read_records(options, topic, timeout_s=120.0):
        body = json.loads(record.value or b"{}")
        if "batch_size" not in body:
            raise ValueError(f"{topic}: a prediction without batch_size; set include_timings")
        timings = body.get("timings") or {}
        forward_ms = timings.get("inference_ms")
        outputs.append(
            Output(
                record.timestamp,
                int(body["source"]["timestamp"]),
                int(body["batch_size"]),
                None if forward_ms is None else float(forward_ms),
            )
        )
    outputs.sort(key=lambda o: o.appended_ms)
    return outputs


def throughput(outputs: list[Output], skip: int) -> dict[str, float]:
    """Records per second between the ``skip``-th and the last append (start-up excluded)."""
    times = [o.appended_ms / 1000 for o in outputs]
    skip = min(skip, max(0, len(times) - 2))
    span = times[-1] - times[skip]
    return {
        "records": float(len(times)),
        "skipped_warmup": float(skip),
        "seconds": span,
        "images_per_s": (len(times) - 1 - skip) / span if span > 0 else 0.0,
        "first_to_last_s": times[-1] - times[0],
    }
