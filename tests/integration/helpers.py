"""Shared helpers for integration tests: produce, read back, check commits, run the service."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeAlias

from aiokafka import ConsumerRecord
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.structs import TopicPartition

from streamer.app import Service
from streamer.config import Settings
from streamer.tools.consume import read_records
from streamer.tools.produce import Message, publish

Record: TypeAlias = ConsumerRecord[bytes, bytes]


async def produce(options: dict[str, Any], topic: str, messages: list[Message]) -> None:
    await publish(options, topic, messages)


async def output_ids(options: dict[str, Any], topic: str) -> set[str]:
    """The ``id`` of every prediction currently in ``topic``."""
    return {json.loads(r.value)["id"] for r in await read_all(options, topic)}


async def read_exactly(
    options: dict[str, Any], topic: str, count: int, timeout_s: float = 240.0
) -> list[Record]:
    """Read the first ``count`` records of ``topic``; fail if they do not arrive in time."""
    return [r async for r in read_records(options, topic, count, timeout_s=timeout_s)]


async def read_all(options: dict[str, Any], topic: str) -> list[Record]:
    """Every record currently in ``topic``."""
    return [r async for r in read_records(options, topic)]


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


class ServiceProcess:
    """``python -m streamer run`` as a child process, for kill and restart tests."""

    def __init__(self, settings: Settings, log_path: Path) -> None:
        self._settings = settings
        self._log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMER_")}
        for name, value in self._settings.model_dump(exclude_none=True).items():
            if isinstance(value, tuple):
                value = ",".join(value)
            env[f"STREAMER_{name.upper()}"] = str(value)
        with self._log_path.open("ab") as log:  # the child keeps its own copy
            self.process = subprocess.Popen(
                [sys.executable, "-m", "streamer", "run"],
                env=env,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )

    def check_alive(self) -> None:
        """Fail at once (with the log) when the service exited instead of waiting out a deadline."""
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(
                f"service exited with {self.process.returncode}:\n{self.log()[-4000:]}"
            )

    def kill(self) -> None:
        """SIGKILL the service and its workers (the whole process group), like a crash."""
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def terminate(self, timeout_s: float = 60) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout_s)

    def log(self) -> str:
        return self._log_path.read_text(errors="replace")
