"""Worker supervision with real spawned processes (no Kafka): deaths, hangs, and workers
whose replies break the protocol."""

from __future__ import annotations

import asyncio
import io
import os
import signal
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from PIL import Image

from streamer.errors import DecodeError, WorkerCrashed
from streamer.metrics import Metrics
from streamer.pipeline.decode_chunks import DecodeChunks
from streamer.vision.decode import DecodeLimits
from streamer.workers import codec, decode_worker
from streamer.workers.pool import WorkerPool
from streamer.workers.process import WorkerState
from streamer.workers.shm import SlotPool
from tests.unit import codec_workers

pytestmark = pytest.mark.timeout(120)


def png(color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (300, 260), color).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture
async def decoders():
    metrics = Metrics()
    with SlotPool(slots=4, payload_bytes=64 * 1024) as slots:
        layout = slots.layout
        pool = WorkerPool(
            "decode",
            1,
            decode_worker.main,
            lambda i: (layout, DecodeLimits()),
            metrics,
            start_timeout_s=60,
        )
        await pool.start()
        try:
            yield pool, slots, metrics
        finally:
            await pool.stop()


async def test_decode_worker_writes_pixels_into_the_slot_and_reports_bad_input(decoders) -> None:
    pool, slots, _ = decoders
    slot = slots.acquire()
    n = slots.write_payload(slot, png((10, 200, 30)))
    seconds, deferred = await asyncio.wait_for(DecodeChunks(pool).submit((slot, n, False)), 30)
    assert seconds > 0 and deferred == 0
    assert np.all(slots.view.pixels[slot][:, 0, 0] == [10, 200, 30])

    n = slots.write_payload(slot, b"definitely not an image")
    with pytest.raises(DecodeError) as info:
        await asyncio.wait_for(DecodeChunks(pool).submit((slot, n, False)), 30)
    assert info.value.reason == "not-an-image"


async def test_a_killed_worker_fails_its_requests_and_is_respawned(decoders) -> None:
    pool, slots, metrics = decoders
    victim = pool.workers[0]
    slot = slots.acquire()
    n = slots.write_payload(slot, png((1, 2, 3)))
    os.kill(victim.pid, signal.SIGKILL)
    # A request to the dying worker fails with WorkerCrashed (retriable), never hangs.
    with pytest.raises(WorkerCrashed) as info:
        await asyncio.wait_for(victim.call((slot, n, False)), 30)
    assert info.value.retriable

    loop = asyncio.get_running_loop()
    started = loop.time()
    while not (pool.running and pool.workers[0] is not victim):
        assert loop.time() - started < 30, "the worker was not respawned"
        await asyncio.sleep(0.05)
    print(f"capacity back {loop.time() - started:.2f} s after the kill")
    assert metrics.worker_restarts.labels("decode")._value.get() == 1
    assert (await asyncio.wait_for(DecodeChunks(pool).submit((slot, n, False)), 30))[0] > 0


async def _pool(slots: SlotPool, metrics: Metrics, **options) -> WorkerPool:  # type: ignore[no-untyped-def]
    layout = slots.layout
    pool = WorkerPool(
        "decode", 1, decode_worker.main, lambda i: (layout, DecodeLimits()), metrics, 60, **options
    )
    await pool.start()
    return pool


async def test_a_standby_twin_takes_over_at_once_and_is_replaced() -> None:
    metrics = Metrics()
    with SlotPool(slots=2, payload_bytes=64 * 1024) as slots:
        pool = await _pool(slots, metrics, standby=True)
        try:
            loop = asyncio.get_running_loop()
            started = loop.time()
            while not (pool.standbys[0] and pool.standbys[0].state is WorkerState.RUNNING):
                assert loop.time() - started < 60, "the twin did not start"
                await asyncio.sleep(0.05)
            victim, twin = pool.workers[0], pool.standbys[0]
            assert twin.pid != victim.pid
            killed = loop.time()
            os.kill(victim.pid, signal.SIGKILL)  # type: ignore[arg-type]
            while pool.workers[0] is not twin:
                assert loop.time() - killed < 10, "the twin did not take over"
                await asyncio.sleep(0.005)
            print(f"capacity back {loop.time() - killed:.3f} s after the kill")
            slot = slots.acquire()
            n = slots.write_payload(slot, png((4, 5, 6)))
            assert (await asyncio.wait_for(DecodeChunks(pool).submit((slot, n, False)), 30))[
                0
            ] > 0  # served by the twin
            while not (pool.standbys[0] and pool.standbys[0].pid not in (victim.pid, twin.pid)):
                assert loop.time() - killed < 60, "no new twin was started"
                await asyncio.sleep(0.05)
            assert metrics.worker_restarts.labels("decode")._value.get() == 1
        finally:
            await pool.stop()


async def test_a_hung_worker_is_killed_by_its_watchdog_and_its_request_fails() -> None:
    metrics = Metrics()
    with SlotPool(slots=2, payload_bytes=64 * 1024) as slots:
        pool = await _pool(slots, metrics, hang_timeout_s=1.0)
        try:
            victim = pool.workers[0]
            os.kill(victim.pid, signal.SIGSTOP)  # type: ignore[arg-type]  # alive, never answers
            slot = slots.acquire()
            n = slots.write_payload(slot, png((7, 8, 9)))
            with pytest.raises(WorkerCrashed):
                await asyncio.wait_for(victim.call((slot, n, False)), 30)
            assert victim.hung
            loop = asyncio.get_running_loop()
            started = loop.time()
            while not (pool.running and pool.workers[0] is not victim):
                assert loop.time() - started < 30, "the hung worker was not replaced"
                await asyncio.sleep(0.05)
            assert (await asyncio.wait_for(DecodeChunks(pool).submit((slot, n, False)), 30))[0] > 0
        finally:
            await pool.stop()


async def test_an_idle_hung_worker_is_found_by_pings() -> None:
    metrics = Metrics()
    with SlotPool(slots=2, payload_bytes=64 * 1024) as slots:
        pool = await _pool(slots, metrics, hang_timeout_s=1.0)
        try:
            victim = pool.workers[0]
            os.kill(victim.pid, signal.SIGSTOP)  # type: ignore[arg-type]  # only pings can tell
            loop = asyncio.get_running_loop()
            started = loop.time()
            while not victim.hung:
                assert loop.time() - started < 10, "the idle hung worker was not detected"
                await asyncio.sleep(0.05)
            print(f"idle hung worker killed {loop.time() - started:.2f} s after SIGSTOP")
        finally:
            await pool.stop()


async def test_with_device_jpeg_decoding_a_jpeg_is_only_checked_and_left_encoded(
    decoders,
) -> None:
    pool, slots, _ = decoders
    slot = slots.acquire()
    slots.view.pixels[slot][...] = 7
    buffer = io.BytesIO()
    Image.new("RGB", (300, 260), (200, 10, 10)).save(buffer, "JPEG")
    n = slots.write_payload(slot, buffer.getvalue())
    _, orientation = await asyncio.wait_for(DecodeChunks(pool).submit((slot, n, True)), 30)
    assert orientation == 1  # deferred to the inference worker
    assert np.all(slots.view.pixels[slot] == 7)  # no pixels were written
    n = slots.write_payload(slot, png((200, 10, 10)))
    _, orientation = await asyncio.wait_for(DecodeChunks(pool).submit((slot, n, True)), 30)
    assert orientation == 0  # not a JPEG: decoded here
    assert np.all(slots.view.pixels[slot][:, 0, 0] == [200, 10, 10])
    n = slots.write_payload(slot, buffer.getvalue()[:40])
    with pytest.raises(DecodeError):  # limits and headers are still checked here
        await asyncio.wait_for(DecodeChunks(pool).submit((slot, n, True)), 30)


async def _until(predicate: Callable[[], object], timeout_s: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        assert loop.time() < deadline, what
        await asyncio.sleep(0.02)


@pytest.mark.parametrize(
    "corrupt",
    [
        codec_workers.request_id_unhashable,  # once made the reply reader itself raise
        codec_workers.request_id_of_no_request,
        codec_workers.error_not_a_wire_error,
    ],
)
async def test_a_worker_that_breaks_the_protocol_is_killed_and_its_request_fails_as_in_a_crash(
    corrupt: codec_workers.Corrupt,
) -> None:
    """Its request fails with ``WorkerCrashed`` (never waits for ever), the process is
    killed (never left running beside its replacement), and a new worker serves."""
    pool = WorkerPool(
        "decode", 1, codec_workers.scripted_decode, lambda i: (corrupt,), Metrics(), 60
    )
    await pool.start()
    try:
        victim = pool.workers[0]
        with pytest.raises(WorkerCrashed):
            await asyncio.wait_for(pool.submit([(codec_workers.POISON, 1, False)]), 30)
        await _until(lambda: victim.exitcode is not None, 10, "the broken worker still runs")
        assert victim.state is WorkerState.STOPPED
        answer = await asyncio.wait_for(pool.submit([(1, 1, False)]), 30)
        assert answer == [(True, (0.001, 0))] and pool.workers[0] is not victim
    finally:
        await pool.stop()


async def test_whatever_makes_the_reply_reader_raise_kills_the_worker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Not only a ``ProtocolError``: the reader never ends with its process running."""

    def broken(*args: Any) -> Any:
        raise RuntimeError("a bug in the owner's reading")

    pool = WorkerPool(
        "decode",
        1,
        codec_workers.scripted_decode,
        lambda i: (codec_workers.untouched,),
        Metrics(),
        60,
    )
    await pool.start()
    try:
        victim = pool.workers[0]
        monkeypatch.setattr(codec, "outcome", broken)
        with pytest.raises(WorkerCrashed):
            await asyncio.wait_for(pool.submit([(1, 1, False)]), 30)
        await _until(lambda: victim.exitcode is not None, 10, "the worker still runs")
    finally:
        await pool.stop()
