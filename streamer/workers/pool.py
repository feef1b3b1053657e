"""A supervised set of worker processes of one kind.

Requests go to the least-loaded running worker. When a worker dies (SIGKILL,
segfault, OOM kill, killed by its watchdog as hung, or recycled by itself after
repeated failures) its pending requests fail with ``WorkerCrashed`` (the caller
retries them) and the pool starts a new one in a named background task.

Every worker is confined before it serves (``workers.sandbox``) unless the pool
is made with ``sandbox=False`` (the ``worker_sandbox`` setting).

With ``standby`` each worker has a started, idle twin (same arguments, e.g. the
same device). When a worker dies its twin takes over at once and a new twin is
started in the background, so capacity returns in milliseconds instead of the
seconds a cold start takes (loading a model). It costs the twin's memory.

Invariants:

1. The pool is the only owner of ``workers``, ``standbys``, the restart chains
   and the backoffs; ``WorkerProcess`` reports a death through ``on_exit`` only,
   and only for a worker that was RUNNING (a failed start raises instead).
2. At most one restart chain per (index, role) runs at a time; a chain for a
   role exists only while that role has no RUNNING worker. A chain installs its
   worker into ``workers``/``standbys`` only once it is RUNNING, so a running
   worker is never overwritten; a death of a process the pool no longer holds
   is ignored.
3. Each (index, role) has one ``supervisor.Backoff`` for the pool's life:
   failed starts and deaths before a worker proved healthy wait ever longer
   (``RESPAWN_BACKOFF_S``), whichever incident they belong to.
4. Every process the pool creates is in ``_members`` until it has exited, and
   ``stop`` stops every member: nothing the pool started outlives it.
5. Failure is fatal (``failed`` is set; ``start`` raises ``WorkerStartError``)
   only when no worker of the kind is running and every index has failed
   ``MAX_FAILED_STARTS`` starts in a row (about 24 s of backoff plus eight start
   attempts, each at most ``start_timeout_s``). While any worker serves, the
   others retry at the longest delay forever. A standby that cannot start is
   logged, counted (``streamer_worker_start_failures_total``) and retried; it is
   never fatal.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from streamer.metrics import Metrics
from streamer.workers.child import WorkerMain
from streamer.workers.process import WorkerProcess, WorkerStartError, WorkerState
from streamer.workers.supervisor import Backoff, Role

log = logging.getLogger(__name__)

RESPAWN_BACKOFF_S = (0.0, 0.5, 1.0, 2.0, 5.0)  # by consecutive failures; the last one repeats
MAX_FAILED_STARTS = 8  # 0 + 0.5 + 1 + 2 + 5 * 4 = 23.5 s of backoff before giving up


def serving(worker: WorkerProcess | None) -> bool:
    return worker is not None and worker.state is WorkerState.RUNNING


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
        sandbox: bool = True,
    ) -> None:
        self.kind = kind
        self._target = WorkerMain(target, sandbox)
        self._args = args
        self._metrics = metrics
        self._start_timeout_s = start_timeout_s
        self._hang_timeout_s = hang_timeout_s
        self._standby = standby
        self._roles = (Role.MAIN, Role.STANDBY) if standby else (Role.MAIN,)
        # Exported as 0 from the start, so that increase() sees the first event.
        metrics.worker_restarts.labels(kind)
        for role in self._roles:
            metrics.worker_start_failures.labels(kind, role.value)
        self._max_failed_starts = MAX_FAILED_STARTS
        self._backoffs = {
            (i, role): Backoff(RESPAWN_BACKOFF_S) for i in range(size) for role in self._roles
        }
        self._members: set[WorkerProcess] = set()
        # Not started yet: a chain replaces each with a RUNNING worker in ``start``.
        self.workers = [self._new(i, Role.MAIN) for i in range(size)]
        self.standbys: list[WorkerProcess | None] = [None] * size
        self._chains: dict[tuple[int, Role], asyncio.Task[None]] = {}
        self._capacity = asyncio.Event()
        self._progress = asyncio.Event()  # a chain's attempt ended, or a worker died
        self._stopping = False
        self.failed: asyncio.Future[None] | None = None

    def _new(self, index: int, role: Role) -> WorkerProcess:
        self._members = {w for w in self._members if w.exitcode is None}
        worker = WorkerProcess(
            self.kind,
            index,
            self._target,
            self._args(index),
            on_exit=self._on_exit,
            hang_timeout_s=self._hang_timeout_s,
            role="-standby" if role is Role.STANDBY else "",
        )
        self._members.add(worker)
        return worker

    @property
    def running(self) -> list[WorkerProcess]:
        return [w for w in self.workers if w.state is WorkerState.RUNNING and not w.hung]

    async def start(self) -> None:
        """Start every worker, retrying failed starts with backoff.

        Returns once every index runs a worker, or once some do and the others
        have failed ``MAX_FAILED_STARTS`` starts (they keep retrying in the
        background). Raises ``WorkerStartError`` when none can be started.

        Then the standbys start, and ``start`` waits for each one's first start to
        end (started or failed; a failed one keeps retrying in the background and
        never fails the pool). So no model loads while the service serves its first
        records: a standby loading then took CPU from the worker serving them
        (measured at a cold start). One after the other, the two loads do not slow
        each other down either.
        """
        self.failed = asyncio.get_running_loop().create_future()
        try:
            for index in range(len(self.workers)):
                self._ensure_chain(index, Role.MAIN)
            await self._wait_until(self._workers_up)
            if self._standby:
                for index in range(len(self.workers)):
                    self._ensure_chain(index, Role.STANDBY)
                await self._wait_until(self._standbys_tried)
        except BaseException:
            await self.stop()
            raise

    async def _wait_until(self, condition: Callable[[], bool]) -> None:
        assert self.failed is not None
        while True:
            self._progress.clear()
            if self.failed.done():
                self.failed.result()  # raises the reason
            if self._stopping:
                raise WorkerStartError(f"the {self.kind} pool stopped while it started")
            if condition():
                return
            await self._progress.wait()

    def _workers_up(self) -> bool:
        """Every index runs a worker, or some do and the others gave up."""
        return bool(self.running) and all(
            w.state is WorkerState.RUNNING or self._gave_up(i) for i, w in enumerate(self.workers)
        )

    def _standbys_tried(self) -> bool:
        """Every standby's first start has ended: it runs, or it failed (and retries)."""
        return all(
            serving(self.standbys[i]) or self._backoffs[(i, Role.STANDBY)].failures > 0
            for i in range(len(self.workers))
        )

    async def submit(self, body: Any, timeout_s: float | None = None) -> Any:
        """Run ``body`` on the least-loaded worker, waiting while none is running.

        ``timeout_s`` is this request's deadline (default: ``hang_timeout_s``); a
        worker that misses it is killed as hung (see ``WorkerProcess.call``).
        """
        while True:
            running = self.running
            if running:
                return await min(running, key=lambda w: w.load).call(body, timeout_s)
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
        if worker is self.workers[index]:
            role = Role.MAIN
        elif worker is self.standbys[index]:
            role = Role.STANDBY
        else:
            return  # a process this pool no longer holds (invariant 2)
        self._update_capacity()
        self._progress.set()
        if self._stopping:
            return
        self._backoffs[(index, role)].exited(worker)
        if role is Role.MAIN:
            self._metrics.worker_restarts.labels(self.kind).inc()
            if self._promote(index) or self._give_up_if_hopeless():
                return
        self._ensure_chain(index, role)

    def _promote(self, index: int) -> bool:
        """Let a running standby take over a dead main worker; start a new standby."""
        twin = self.standbys[index]
        if twin is None or twin.state is not WorkerState.RUNNING or twin.hung:
            return False
        self.workers[index], self.standbys[index] = twin, None
        log.warning("standby took over kind=%s index=%d pid=%s", self.kind, index, twin.pid)
        self._update_capacity()
        self._ensure_chain(index, Role.STANDBY)
        return True

    def _ensure_chain(self, index: int, role: Role) -> None:
        key = (index, role)
        current = self._chains.get(key)
        if self._stopping or (current is not None and not current.done()):
            return  # one chain per (index, role): the one running will start the worker
        name = f"respawn-{self.kind}-{index}-{role.value}"
        task = asyncio.create_task(self._restart_chain(index, role), name=name)
        self._chains[key] = task
        task.add_done_callback(self._chain_done)

    async def _restart_chain(self, index: int, role: Role) -> None:
        """Start a worker for (index, role), waiting out the backoff before each attempt."""
        key = (index, role)
        backoff = self._backoffs[key]
        try:
            while not self._stopping:
                await asyncio.sleep(backoff.delay_s)
                if self._stopping or (role is Role.MAIN and self._promote(index)):
                    return
                worker = self._new(index, role)
                try:
                    await worker.start(self._start_timeout_s)
                except Exception as exc:
                    if not isinstance(exc, WorkerStartError):
                        await worker.kill()  # failed half way: nothing may be left running
                    backoff.start_failed()
                    self._metrics.worker_start_failures.labels(self.kind, role.value).inc()
                    log.error(
                        "worker start failed kind=%s index=%d role=%s failures=%d retry_in_s=%.1f"
                        " error=%s",
                        self.kind,
                        index,
                        role.value,
                        backoff.failures,
                        backoff.delay_s,
                        exc,
                    )
                    self._progress.set()
                    if role is Role.MAIN and self._give_up_if_hopeless():
                        return
                    continue
                backoff.started(worker)
                if role is Role.MAIN:
                    self.workers[index] = worker
                else:
                    self.standbys[index] = worker
                self._update_capacity()
                self._progress.set()
                return
        finally:
            if self._chains.get(key) is asyncio.current_task():
                del self._chains[key]  # now, not in a done callback: a death may come first

    def _chain_done(self, task: asyncio.Task[None]) -> None:
        """A chain that ends with an error is a bug: fail loudly instead of losing a worker."""
        error = None if task.cancelled() else task.exception()
        if error is None:
            return
        log.error("restart chain broke kind=%s task=%s", self.kind, task.get_name(), exc_info=error)
        if self.failed is not None and not self.failed.done():
            self.failed.set_exception(error)

    def _gave_up(self, index: int) -> bool:
        return self._backoffs[(index, Role.MAIN)].failures >= self._max_failed_starts

    def _give_up_if_hopeless(self) -> bool:
        """Set ``failed`` when no worker runs and every index failed too often (invariant 5)."""
        if self.running or not all(self._gave_up(i) for i in range(len(self.workers))):
            return False
        error = WorkerStartError(
            f"no {self.kind} worker can be started: every one failed"
            f" {self._max_failed_starts} starts in a row"
        )
        log.error("giving up kind=%s error=%s", self.kind, error)
        if self.failed is not None and not self.failed.done():
            self.failed.set_exception(error)
        self._progress.set()
        return True

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Stop every worker the pool started (invariant 4); safe to call twice."""
        self._stopping = True
        self._progress.set()  # a ``start`` still waiting gives up
        chains = list(self._chains.values())
        for task in chains:
            task.cancel()
        await asyncio.gather(*chains, return_exceptions=True)
        members = list(self._members)
        await asyncio.gather(*(w.stop(timeout_s) for w in members), return_exceptions=True)
        self._update_capacity()
