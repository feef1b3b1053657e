"""Inference workers that fail in each way below; the service keeps serving.

Each test runs the real service on the real broker with a fault injected into its
inference workers (``tests/integration/fault_workers.py``): a worker that dies at
start five times in a row, one that hangs on an image, one that raises an error
nobody wrapped, one with a sticky device error. In every case the good images are
predicted, the service is still serving afterwards, and once it has stopped no
process it started is left running and no shared memory is left in /dev/shm.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from streamer import corpus
from streamer.schemas import DLQ_REASON, DLQ_STAGE
from streamer.workers import inference_worker
from streamer.workers import pool as pool_module
from streamer.workers.process import WorkerStartError
from streamer.workers.shm import SHM_DIR
from tests.integration import fault_workers
from tests.integration.helpers import (
    produce,
    read_all,
    read_exactly,
    running_service,
    service_settings,
    wait_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]


@pytest.fixture
def fault(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """Install a fault in every inference worker the engine starts from now on."""

    def install(name: str) -> Path:
        monkeypatch.setenv("STREAMER_TEST_FAULT", name)
        monkeypatch.setenv("STREAMER_TEST_FAULT_DIR", str(tmp_path))
        monkeypatch.setattr(inference_worker, "main", fault_workers.inference_main)
        return tmp_path

    return install


def _children() -> set[int]:
    """Running child processes of this test process, the resource tracker aside."""
    me = str(os.getpid())
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if ppid == me and state != "Z" and b"resource_tracker" not in cmdline:
            found.add(int(entry.name))
    return found


def _running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@contextlib.asynccontextmanager
async def every_child_seen() -> AsyncIterator[set[int]]:
    """The pids of every child process seen (sampled every 50 ms) inside the block."""
    seen: set[int] = set()

    async def sample() -> None:
        while True:
            seen.update(_children())
            await asyncio.sleep(0.05)

    sampler = asyncio.create_task(sample(), name="child-sampler")
    try:
        yield seen
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler


async def _assert_nothing_left(seen: set[int], before: set[int]) -> None:
    started = seen - before
    assert started, "no worker process was seen"
    await wait_for(lambda: not [p for p in started if _running(p)], 15, "every worker exited")
    segments = sorted(p.name for p in SHM_DIR.glob(f"streamer-{os.getpid()}-*"))
    assert segments == [], f"shared memory left behind: {segments}"


def _images(samples: list[corpus.Sample], count: int) -> list[tuple[bytes, bytes, list]]:
    return [(s.name.encode(), s.data, []) for s in samples[:count]]


TRIGGER = (b"trigger.png", fault_workers.trigger_png(), [])


async def _serves_more(service_settings_, kafka_options, samples, already: int) -> None:
    """Four more images after the fault are predicted: the service still serves."""
    more = [(f"after-{i}".encode(), s.data, []) for i, s in enumerate(samples[50:54])]
    await produce(kafka_options, service_settings_.input_topic, more)
    await read_exactly(kafka_options, service_settings_.output_topic, already + 4, 120)


async def test_an_inference_worker_that_dies_at_start_five_times_still_serves(
    kafka_bootstrap, kafka_options, unique_name, new_topics, samples, fault
) -> None:
    state = fault("die-at-start")
    settings = service_settings(
        kafka_bootstrap, unique_name, inference_standby=True, max_batch_size=8
    )
    await new_topics("in", "out", "dlq")
    before = _children()
    started = time.monotonic()
    async with every_child_seen() as seen:
        async with running_service(settings) as service:
            ready_s = time.monotonic() - started
            await produce(kafka_options, settings.input_topic, _images(samples, 16))
            await read_exactly(kafka_options, settings.output_topic, 16, 180)
            await _serves_more(settings, kafka_options, samples, 16)
            assert service._fatal is None
        await _assert_nothing_left(seen, before)
    starts = int((state / "starts").read_text())
    assert starts > fault_workers.DIE_AT_START
    assert await read_all(kafka_options, settings.dlq_topic) == []
    print(f"inference starts={starts} (5 died); ready after {ready_s:.1f} s")


async def test_a_service_whose_inference_worker_can_never_start_stops_loudly_and_cleanly(
    unique_name, fault, monkeypatch
) -> None:
    # The backoff's 23.5 s only make the test slower (tests/unit/test_supervision.py
    # covers the schedule): 8 starts with short pauses.
    monkeypatch.setattr(pool_module, "RESPAWN_BACKOFF_S", (0.0, 0.1))
    fault("die-always")
    settings = service_settings(
        "127.0.0.1:1", unique_name, inference_standby=True
    )  # fails before Kafka is needed
    before = _children()
    started = time.monotonic()
    async with every_child_seen() as seen:
        with pytest.raises(WorkerStartError, match="no inference worker can be started"):
            async with running_service(settings):
                pass
        await _assert_nothing_left(seen, before)
    print(f"start failed loudly after {time.monotonic() - started:.1f} s")


async def test_a_record_that_hangs_the_worker_is_dead_lettered_as_worker_hung(
    kafka_bootstrap, kafka_options, unique_name, new_topics, samples, fault
) -> None:
    fault("hang")
    settings = service_settings(
        kafka_bootstrap, unique_name, inference_standby=True, max_batch_size=8, worker_timeout_s=20
    )
    await new_topics("in", "out", "dlq")
    before = _children()
    async with every_child_seen() as seen:
        async with running_service(settings) as service:
            await produce(kafka_options, settings.input_topic, _images(samples, 16))
            await read_exactly(kafka_options, settings.output_topic, 16, 180)  # warmed up
            sent = time.monotonic()
            await produce(kafka_options, settings.input_topic, [TRIGGER, *_images(samples, 8)])
            dead = await read_exactly(kafka_options, settings.dlq_topic, 1, 300)
            hung_s = time.monotonic() - sent
            await read_exactly(kafka_options, settings.output_topic, 24, 120)
            await _serves_more(settings, kafka_options, samples, 24)
            assert service._fatal is None
        await _assert_nothing_left(seen, before)
    headers = dict(dead[0].headers)
    assert dead[0].key == b"trigger.png"
    assert (headers[DLQ_REASON], headers[DLQ_STAGE]) == (b"worker-hung", b"inference")
    print(f"hanging record dead-lettered {hung_s:.1f} s after it was produced")


async def test_an_unknown_error_in_the_worker_dead_letters_the_record_not_the_service(
    kafka_bootstrap, kafka_options, unique_name, new_topics, samples, fault
) -> None:
    fault("unknown")
    settings = service_settings(
        kafka_bootstrap, unique_name, inference_standby=True, max_batch_size=8
    )
    await new_topics("in", "out", "dlq")
    before = _children()
    async with every_child_seen() as seen:
        async with running_service(settings) as service:
            await produce(kafka_options, settings.input_topic, [TRIGGER, *_images(samples, 16)])
            dead = await read_exactly(kafka_options, settings.dlq_topic, 1, 180)
            await read_exactly(kafka_options, settings.output_topic, 16, 180)
            await _serves_more(settings, kafka_options, samples, 16)
            assert service._fatal is None
        await _assert_nothing_left(seen, before)
    assert [r.key for r in await read_all(kafka_options, settings.dlq_topic)] == [b"trigger.png"]
    headers = dict(dead[0].headers)
    assert (headers[DLQ_REASON], headers[DLQ_STAGE]) == (b"inference-failed", b"inference")


async def test_a_sticky_device_error_recycles_the_worker_and_loses_nothing(
    kafka_bootstrap, kafka_options, unique_name, new_topics, samples, fault
) -> None:
    state = fault("sticky")
    settings = service_settings(
        kafka_bootstrap,
        unique_name,
        inference_standby=True,
        max_batch_size=8,
        max_record_attempts=5,
    )
    await new_topics("in", "out", "dlq")
    before = _children()
    async with every_child_seen() as seen:
        async with running_service(settings) as service:
            await produce(kafka_options, settings.input_topic, [TRIGGER, *_images(samples, 24)])
            await read_exactly(kafka_options, settings.output_topic, 25, 240)
            await _serves_more(settings, kafka_options, samples, 25)
            recycled = service.metrics.worker_restarts.labels("inference")._value.get()
            assert service._fatal is None
        await _assert_nothing_left(seen, before)
    assert (state / "stuck").exists(), "the fault never fired"
    assert recycled >= 1, "the stuck worker was never replaced"
    assert await read_all(kafka_options, settings.dlq_topic) == []
