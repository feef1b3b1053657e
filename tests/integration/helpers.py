"""Shared helpers for integration tests: produce, read back, check commits, run the service."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeAlias

from aiokafka import ConsumerRecord
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.structs import TopicPartition

from streamer.app import Service
from streamer.bench.service import ServiceProcess as ChildServiceProcess
from streamer.config import Settings
from streamer.tools.consume import read_records
from streamer.tools.produce import Message, publish

Record: TypeAlias = ConsumerRecord[bytes, bytes]


async def kcat(*args: str, stdin: bytes | None = None) -> str:
    """Run kcat without blocking the event loop (the service may run in this loop); its
    standard output, or a failed assertion with its standard error."""
    process = await asyncio.create_subprocess_exec(
        "kcat",
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(stdin), 60)
    assert process.returncode == 0, stderr.decode()
    return stdout.decode()


async def produce(options: dict[str, Any], topic: str, messages: list[Message]) -> None:
    await publish(options, topic, messages)


async def output_ids(options: dict[str, Any], topic: str) -> set[str]:
    """The ``id`` of every (committed) prediction currently in ``topic``."""
    return {json.loads(r.value)["id"] for r in await read_all(options, topic)}


def count_by_id(records: list[Record]) -> tuple[int, int]:
    """(distinct ids, duplicates) among predictions: the verifier's two numbers."""
    ids = [json.loads(r.value)["id"] for r in records]
    return len(set(ids)), len(ids) - len(set(ids))


async def read_exactly(
    options: dict[str, Any], topic: str, count: int, timeout_s: float = 240.0
) -> list[Record]:
    """Read the first ``count`` records of ``topic``; fail if they do not arrive in time."""
    return [r async for r in read_records(options, topic, count, timeout_s=timeout_s)]


async def read_all(
    options: dict[str, Any], topic: str, isolation_level: str = "read_committed"
) -> list[Record]:
    """Every record currently in ``topic`` (by default, of committed transactions only)."""
    return [r async for r in read_records(options, topic, isolation_level=isolation_level)]


async def wait_for(
    condition: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.2
) -> Any:
    """Poll an (async or sync) condition until truthy; fail with ``what`` at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(interval_s)


async def committed_and_end(
    options: dict[str, Any], group: str, topic: str
) -> tuple[dict[int, int], dict[int, int]]:
    """(committed offset, end offset) per partition of ``topic`` for ``group``."""
    admin = AIOKafkaAdminClient(**options)
    await admin.start()
    try:
        committed_raw = await admin.list_consumer_group_offsets(group)
        described = await admin.describe_topics([topic])
    finally:
        await admin.close()
    partitions = [p["partition"] for p in described[0]["partitions"]]
    committed = {
        tp.partition: meta.offset for tp, meta in committed_raw.items() if tp.topic == topic
    }
    consumer_end = await _end_offsets(options, topic, partitions)
    return committed, consumer_end


async def _end_offsets(
    options: dict[str, Any], topic: str, partitions: list[int]
) -> dict[int, int]:
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(**options)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in partitions]
        ends = await consumer.end_offsets(tps)
        return {tp.partition: offset for tp, offset in ends.items()}
    finally:
        await consumer.stop()


def service_settings(bootstrap: str, prefix: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "bootstrap_servers": bootstrap,
        "input_topic": f"{prefix}-in",
        "output_topic": f"{prefix}-out",
        "dlq_topic": f"{prefix}-dlq",
        "group_id": prefix,
        "weights": "random:0",
        "device": "cpu",
        "metrics_port": 0,
        "max_in_flight": 64,
        "max_batch_size": 16,
        "max_batch_delay_ms": 20,
        "decode_workers": 1,
        # A standby is one more model to load before a service is ready;
        # the tests of worker deaths, where it matters, turn it on.
        "inference_standby": False,
        # One model per service, as above; tests of several CPU workers ask for them.
        "cpu_inference_workers": 1,
        # The start-up batch-time table (tested in tests/unit) costs each start a
        # second and makes batch sizes depend on the machine's speed at that moment.
        "batch_size_from_table": False,
        "commit_interval_ms": 200,
        "drain_timeout_s": 30,
    }
    values.update(overrides)
    return Settings(**values)


@contextlib.asynccontextmanager
async def running_service(settings: Settings) -> AsyncIterator[Service]:
    """The service inside this test's event loop, stopped (and drained) at exit."""
    service = Service(settings)
    await service.start()
    try:
        yield service
    finally:
        await service.stop()


class ServiceProcess(ChildServiceProcess):
    """``python -m streamer run`` as a child process (the benchmark's), plus a crash switch."""

    def kill(self) -> None:
        """SIGKILL the service and its workers (the whole process group), like a crash."""
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def terminate(self, timeout_s: float = 60) -> int | None:
        """SIGTERM: the service drains, commits and exits (SIGKILL after the timeout)."""
        return self.stop(timeout_s)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")
