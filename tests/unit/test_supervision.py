"""Worker supervision with real spawned processes that fail on purpose (no Kafka).

The targets are in ``fault_workers``: each start appends its pid to a file, and its
number decides whether it dies before ready, right after, or serves. The backoff
schedule is shortened so that a test runs in seconds; the rules are the pool's.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest

from streamer.errors import WorkerCrashed, WorkerError
from streamer.metrics import Metrics
from streamer.workers import pool as pool_module
from streamer.workers.child import EXIT_RECYCLE, MAX_CONSECUTIVE_FAILURES
from streamer.workers.pool import WorkerPool
from streamer.workers.process import WorkerProcess, WorkerStartError, WorkerState
from tests.unit import fault_workers
from tests.unit.fault_workers import started_pids

pytestmark = pytest.mark.timeout(60)

FAST_BACKOFF_S = (0.0, 0.01, 0.02, 0.05)
MAX_FAILED_STARTS = 6


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pool_module, "RESPAWN_BACKOFF_S", FAST_BACKOFF_S)
    monkeypatch.setattr(pool_module, "MAX_FAILED_STARTS", MAX_FAILED_STARTS, raising=False)


def make_pool(
    tmp_path: Path,
    metrics: Metrics,
    size: int = 1,
    die_before_ready: Callable[[int], Any] = lambda i: (),
    die_after_ready: Callable[[int], Any] = lambda i: (),
    **options: Any,
) -> WorkerPool:
    """A pool of ``fault_workers.flaky``; index ``i`` counts its starts in ``starts-i``."""
    return WorkerPool(
        "decode",
        size,
        fault_workers.flaky,
        lambda i: (str(tmp_path / f"starts-{i}"), die_before_ready(i), die_after_ready(i)),
        metrics,
        start_timeout_s=30,
        **options,
    )


def starts(tmp_path: Path, index: int = 0) -> int:
    return len(started_pids(tmp_path / f"starts-{index}"))


def serving(worker: WorkerProcess | None) -> bool:
    return worker is not None and worker.state is WorkerState.RUNNING


def alive(pid: int) -> bool:
    """The process exists and is not a zombie (/proc: psutil is not a dependency)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


async def wait_until(predicate: Callable[[], object], timeout_s: float, what: str) -> float:
    """Poll ``predicate`` until it holds; the seconds it took."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    while not predicate():
        assert loop.time() - started < timeout_s, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)
    return loop.time() - started


def start_failures(metrics: Metrics, role: str) -> float:
    return metrics.worker_start_failures.labels("decode", role)._value.get()


async def test_start_failure_series_are_exported_at_zero(tmp_path: Path) -> None:
    metrics = Metrics()
    make_pool(tmp_path, metrics, standby=True)
    text = generate_latest(metrics.registry).decode()
    for role in ("main", "standby"):
        assert f'streamer_worker_start_failures_total{{kind="decode",role="{role}"}} 0.0' in text


async def test_a_worker_that_dies_at_start_is_retried_until_it_serves(tmp_path: Path) -> None:
    metrics = Metrics()
    pool = make_pool(tmp_path, metrics, die_before_ready=lambda i: range(1, 6))
    try:
        await pool.start()  # five deaths at start, then a start that works
        assert await asyncio.wait_for(pool.submit(("echo", 7)), 10) == 7
        assert starts(tmp_path) == 6
        assert start_failures(metrics, "main") == 5
        assert pool.failed is not None and not pool.failed.done()
    finally:
        await pool.stop()


async def test_start_gives_up_after_a_bounded_number_of_failed_starts(tmp_path: Path) -> None:
    metrics = Metrics()
    pool = make_pool(tmp_path, metrics, die_before_ready=lambda i: range(1, 1000))
    try:
        with pytest.raises(WorkerStartError) as info:
            await pool.start()
        assert starts(tmp_path) == MAX_FAILED_STARTS
        assert f"{MAX_FAILED_STARTS} starts in a row" in str(info.value)
    finally:
        await pool.stop()
    assert not [pid for pid in started_pids(tmp_path / "starts-0") if alive(pid)]


async def test_a_respawn_storm_starts_one_process_at_a_time_and_leaves_no_orphans(
    tmp_path: Path,
) -> None:
    metrics = Metrics()
    # Start 1 serves; after it is killed, starts 2-4 die before ready, start 5 serves.
    pool = make_pool(tmp_path, metrics, die_before_ready=lambda i: range(2, 5))
    try:
        await pool.start()
        victim = pool.workers[0]
        assert victim.pid is not None
        os.kill(victim.pid, signal.SIGKILL)
        await wait_until(
            lambda: pool.running and pool.workers[0] is not victim, 20, "a serving respawn"
        )
        assert await asyncio.wait_for(pool.submit(("echo", 1)), 10) == 1
    finally:
        await pool.stop()
    pids = started_pids(tmp_path / "starts-0")
    assert not [pid for pid in pids if alive(pid)], "processes the pool started outlived stop()"
    assert len(pids) == 5, "a failed start began a second restart chain"
    assert pool.failed is not None and not pool.failed.done()
    assert start_failures(metrics, "main") == 3
    assert metrics.worker_restarts.labels("decode")._value.get() == 1


async def test_a_worker_that_dies_right_after_ready_is_started_ever_slower_then_fatal(
    tmp_path: Path,
) -> None:
    metrics = Metrics()
    # Start 1 serves; every later start reports ready and dies at once.
    pool = make_pool(tmp_path, metrics, die_after_ready=lambda i: range(2, 1000))
    try:
        await pool.start()
        assert await asyncio.wait_for(pool.submit(("echo", 1)), 10) == 1  # proved healthy
        assert pool.failed is not None
        os.kill(pool.workers[0].pid, signal.SIGKILL)  # type: ignore[arg-type]
        with pytest.raises(WorkerStartError):
            await asyncio.wait_for(asyncio.shield(pool.failed), 30)
        assert starts(tmp_path) == 1 + MAX_FAILED_STARTS
    finally:
        await pool.stop()
    assert not [pid for pid in started_pids(tmp_path / "starts-0") if alive(pid)]


async def test_start_returns_once_the_standby_is_up_so_no_model_loads_while_serving(
    tmp_path: Path,
) -> None:
    """At a cold start, a standby still loading at the first records took CPU from the worker."""
    pool = make_pool(tmp_path, Metrics(), standby=True)
    try:
        await pool.start()
        assert serving(pool.workers[0]) and serving(pool.standbys[0])
        assert starts(tmp_path) == 2
    finally:
        await pool.stop()


async def test_a_standby_that_cannot_start_is_retried_and_never_fatal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    metrics = Metrics()
    many = MAX_FAILED_STARTS + 2
    # Start 1 is the main worker; every later start (the standby's) dies before ready.
    pool = make_pool(tmp_path, metrics, die_before_ready=lambda i: range(2, 1000), standby=True)
    try:
        await pool.start()
        failed = pool.failed
        assert failed is not None
        await wait_until(
            lambda: failed.done() or start_failures(metrics, "standby") >= many,
            30,
            f"{many} failed standby starts",
        )
        assert not failed.done(), "a standby that cannot start stopped the service"
        assert await asyncio.wait_for(pool.submit(("echo", 2)), 10) == 2
        assert start_failures(metrics, "main") == 0
        assert "worker start failed kind=decode index=0 role=standby" in caplog.text
    finally:
        await pool.stop()
    assert starts(tmp_path) - 1 == start_failures(metrics, "standby")  # one chain, no more


async def test_an_index_that_cannot_start_retries_while_another_serves(tmp_path: Path) -> None:
    metrics = Metrics()
    many = MAX_FAILED_STARTS + 2
    # Index 1 serves at start 1; once killed, it never starts again.
    pool = make_pool(
        tmp_path, metrics, size=2, die_before_ready=lambda i: range(2, 1000) if i else ()
    )
    try:
        await pool.start()
        failed = pool.failed
        assert failed is not None
        os.kill(pool.workers[1].pid, signal.SIGKILL)  # type: ignore[arg-type]
        await wait_until(
            lambda: failed.done() or start_failures(metrics, "main") >= many,
            30,
            f"{many} failed starts of index 1",
        )
        assert not failed.done(), "one index that cannot start stopped the service"
        assert await asyncio.wait_for(pool.submit(("echo", 5)), 10) == 5  # index 0 serves
        assert starts(tmp_path, 0) == 1
    finally:
        await pool.stop()


async def test_a_recycled_worker_is_not_a_crash_and_its_standby_takes_over(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    metrics = Metrics()
    pool = make_pool(tmp_path, metrics, standby=True)
    try:
        await pool.start()
        await wait_until(
            lambda: serving(pool.standbys[0]),
            20,
            "the standby",
        )
        victim, twin = pool.workers[0], pool.standbys[0]
        for _ in range(MAX_CONSECUTIVE_FAILURES):
            with pytest.raises(WorkerError):
                await asyncio.wait_for(victim.call(("fail", None)), 10)
        await wait_until(lambda: pool.workers[0] is twin, 10, "the standby to take over")
        assert victim.exitcode == EXIT_RECYCLE
        assert metrics.worker_restarts.labels("decode")._value.get() == 1
        assert await asyncio.wait_for(pool.submit(("echo", 3)), 10) == 3
        await wait_until(
            lambda: serving(pool.standbys[0]),
            20,
            "a new standby",
        )
    finally:
        await pool.stop()
    about_victim = [r for r in caplog.records if f"pid={victim.pid}" in r.getMessage()]
    assert any("recycled" in r.getMessage() for r in about_victim)
    assert not [r for r in about_victim if r.levelno >= logging.ERROR], "logged as a crash"


async def test_the_request_whose_deadline_ran_out_is_the_hung_one(tmp_path: Path) -> None:
    metrics = Metrics()
    pool = make_pool(tmp_path, metrics, hang_timeout_s=1.0)
    try:
        await pool.start()
        victim = pool.workers[0]
        with pytest.raises(WorkerCrashed) as info:
            await asyncio.wait_for(pool.submit(("sleep", 30)), 10)
        assert info.value.hung and victim.hung
        await wait_until(lambda: pool.running, 20, "a replacement")
    finally:
        await pool.stop()


async def test_a_request_deadline_is_its_own_and_acted_on_promptly(tmp_path: Path) -> None:
    metrics = Metrics()
    pool = make_pool(tmp_path, metrics, hang_timeout_s=30.0)
    try:
        await pool.start()
        # Answered within its deadline: nothing happens, and the deadline does not stay.
        assert await asyncio.wait_for(pool.submit(("sleep", 0.1), timeout_s=1.0), 10) == 0.1
        assert await asyncio.wait_for(pool.submit(("sleep", 1.2)), 10) == 1.2
        victim = pool.workers[0]
        loop = asyncio.get_running_loop()
        sent = loop.time()
        late = asyncio.ensure_future(pool.submit(("sleep", 30), timeout_s=1.0))
        behind = asyncio.ensure_future(pool.submit(("echo", 4)))  # queued behind it
        with pytest.raises(WorkerCrashed) as info:
            await asyncio.wait_for(late, 10)
        waited = loop.time() - sent
        print(f"a 1 s deadline acted on after {waited:.3f} s")
        assert info.value.hung
        assert 1.0 <= waited < 1.6, f"a 1 s deadline acted on after {waited:.2f} s"
        with pytest.raises(WorkerCrashed) as info:
            await asyncio.wait_for(behind, 10)
        assert not info.value.hung  # held by the same worker, but its deadline had not passed
        assert victim.hung
    finally:
        await pool.stop()
