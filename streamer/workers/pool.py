"""A supervised set of worker processes of one kind.

Requests go to the least-loaded running worker. When a worker dies (SIGKILL,
segfault, OOM kill, or killed by its watchdog as hung) its pending requests fail
with ``WorkerCrashed`` (the caller retries them) and the pool respawns it in a
named background task. If a worker cannot be started again the pool fails
loudly: ``failed`` is set and the service stops instead of hanging with no
capacity.

With ``standby`` each worker has a started, idle twin (same arguments, e.g. the
same device). When a worker dies its twin takes over at once and a new twin is
started in the background, so capacity returns in milliseconds instead of the
seconds a cold start takes (loading a model). It costs the twin's memory.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from streamer.metrics import Metrics
from streamer.workers.process import WorkerProcess, WorkerState

log = logging.getLogger(__name__)

RESPAWN_BACKOFF_S = (0.0, 0.5, 1.0, 2.0, 5.0)


class WorkerPool:
    def __init__(
        self,
        kind: str,
        size: int,
        target: Callable[..., None],
        args: Callable[[int], tuple[Any, ...]],
        metrics: Metrics,
        start_timeout_s: float,
        hang_timeout_s: float | None = None,
        standby: bool = False,
    ) -> None:
        self.kind = kind
        self._target = target
        self._args = args
        self._metrics = metrics
        metrics.worker_restarts.labels(kind)  # exported as 0 from the start, so increase() works
        self._start_timeout_s = start_timeout_s
        self._hang_timeout_s = hang_timeout_s
        self.workers = [self._make(i) for i in range(size)]
        self._standby = standby
        self.standbys: list[WorkerProcess | None] = [None] * size  # started after the workers
        self._respawns: set[asyncio.Task[None]] = set()
        self._capacity = asyncio.Event()
        self._stopping = False
        self.failed: asyncio.Future[None] | None = None

    def _make(self, index: int, standby: bool = False) -> WorkerProcess:
        return WorkerProcess(
            self.kind,
            index,
            self._target,
            self._args(index),
            on_exit=self._on_exit,
            hang_timeout_s=self._hang_timeout_s,
            role="-standby" if standby else "",
        )

    @property
    def running(self) -> list[WorkerProcess]:
        return [w for w in self.workers if w.state is WorkerState.RUNNING]

    async def start(self) -> None:
        self.failed = asyncio.get_running_loop().create_future()
        await asyncio.gather(*(w.start(self._start_timeout_s) for w in self.workers))
        self._update_capacity()
        if self._standby:  # in the background: the service is ready without waiting for them
            for index in range(len(self.workers)):
                self._spawn_in_background(index, standby=True, name=f"{self.kind}-{index}-standby")

    async def submit(self, body: Any) -> Any:
        """Run ``body`` on the least-loaded worker, waiting while none is running."""
        while True:
            running = self.running
            if running:
                return await min(running, key=lambda w: w.load).call(body)
            await self._capacity.wait()

    def _update_capacity(self) -> None:
        alive = len(self.running)
        self._metrics.workers_alive.labels(self.kind).set(alive)
        if alive:
            self._capacity.set()
        else:
            self._capacity.clear()

    def _on_exit(self, worker: WorkerProcess) -> None:
        index = worker.index
        standby = worker is self.standbys[index]
        if not standby:
            self._metrics.worker_restarts.labels(self.kind).inc()
            twin = self.standbys[index]
            if twin is not None and twin.state is WorkerState.RUNNING and not self._stopping:
                self.workers[index], self.standbys[index] = twin, None
                log.warning("standby took over kind=%s index=%d pid=%s", self.kind, index, twin.pid)
                standby = True  # what is missing now is a twin
        self._update_capacity()
        if not self._stopping:
            self._spawn_in_background(index, standby, worker.name)

    def _spawn_in_background(self, index: int, standby: bool, name: str) -> None:
        task = asyncio.create_task(self._respawn(index, standby), name=f"respawn-{name}")
        self._respawns.add(task)
        task.add_done_callback(self._respawns.discard)

    async def _respawn(self, index: int, standby: bool) -> None:
        for attempt, delay in enumerate(RESPAWN_BACKOFF_S, start=1):
            await asyncio.sleep(delay)
            if self._stopping:
                return
            worker = self._make(index, standby)
            if standby:
                self.standbys[index] = worker
            else:
                self.workers[index] = worker
            try:
                await worker.start(self._start_timeout_s)
            except Exception as exc:
                log.error(
                    "respawn failed kind=%s index=%d attempt=%d error=%s",
                    self.kind,
                    index,
                    attempt,
                    exc,
                )
                continue
            self._update_capacity()
            log.info("worker respawned kind=%s index=%d pid=%s", self.kind, index, worker.pid)
            return
        if self.failed is not None and not self.failed.done():
            self.failed.set_exception(
                RuntimeError(f"{self.kind} worker {index} cannot be restarted")
            )

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Stop every worker; safe to call twice."""
        self._stopping = True
        for task in list(self._respawns):
            task.cancel()
        await asyncio.gather(*self._respawns, return_exceptions=True)
        everyone = self.workers + [w for w in self.standbys if w is not None]
        await asyncio.gather(*(w.stop(timeout_s) for w in everyone), return_exceptions=True)
        self._update_capacity()
