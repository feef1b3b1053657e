"""Dynamic batching: gather items until the batch is full or has waited long enough.

Each ``submit`` gets its own future. A batch is dispatched when it is full, or
when its first item has waited its fill time, whichever comes first. The policy
(``batch_policy``) says what full and long enough are: ``max_batch_size`` and
``max_batch_delay_ms`` by default, or sizes and waits chosen for a latency target
from measured batch times and the ``backlog`` (items on their way here).
At most ``max_concurrent_batches`` run at once; while they run, new items keep
accumulating, so batches grow under load and stay small (low latency) when idle.

Ray Serve's rule holds: the batch function must return exactly one result per
item, in order; an exception (or a wrong-length result) fails every item of the
batch it belongs to, and no other.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from streamer.pipeline.batch_policy import BatchPolicy, FixedPolicy

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class _Item(Generic[T, R]):
    value: T
    future: asyncio.Future[R]
    enqueued: float = field(default=0.0)


@dataclass(frozen=True)
class BatchInfo:
    size: int
    fill_s: float  # first item enqueued -> dispatched
    limit: int = 0  # the size limit the policy set for this batch


class Batcher(Generic[T, R]):
    def __init__(
        self,
        run_batch: Callable[[Sequence[T]], Awaitable[Sequence[R]]],
        *,
        max_batch_size: int,
        max_batch_delay_ms: float,
        max_concurrent_batches: int = 1,
        on_dispatch: Callable[[BatchInfo], None] | None = None,
        policy: BatchPolicy | None = None,
        backlog: Callable[[], int] = lambda: 0,
    ) -> None:
        if max_batch_size < 1 or max_concurrent_batches < 1:
            raise ValueError("batch size and concurrency must be at least 1")
        self._run_batch = run_batch
        self._policy = policy or FixedPolicy(max_batch_size, max_batch_delay_ms / 1000.0)
        self._backlog = backlog
        self._max_size = max_batch_size  # the size limit of the batch being filled
        self._slots = asyncio.Semaphore(max_concurrent_batches)
        self._on_dispatch = on_dispatch
        self._pending: list[_Item[T, R]] = []
        self._nonempty = asyncio.Event()
        self._full = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        if self._loop_task is None:
            self._loop_task = asyncio.create_task(self._dispatch_loop(), name="batcher")

    async def stop(self) -> None:
        """Cancel the dispatcher and fail whatever is still queued; safe to call twice."""
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
            self._loop_task = None
        await asyncio.gather(*self._running, return_exceptions=True)
        for item in self._pending:
            if not item.future.done():
                item.future.set_exception(asyncio.CancelledError("batcher stopped"))
        self._pending.clear()

    async def __aenter__(self) -> Batcher[T, R]:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def queued(self) -> int:
        return len(self._pending)

    def submit(self, value: T) -> asyncio.Future[R]:
        if self._loop_task is None or self._loop_task.done():
            raise RuntimeError("batcher is not running")
        loop = asyncio.get_running_loop()
        item: _Item[T, R] = _Item(value, loop.create_future(), loop.time())
        self._policy.arrived(item.enqueued)
        self._pending.append(item)
        self._nonempty.set()
        if len(self._pending) >= self._max_size:
            self._full.set()
        return item.future

    async def _dispatch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._nonempty.wait()
            queued, backlog = len(self._pending), self._backlog()
            self._max_size = self._policy.size_limit(queued, backlog)
            if queued >= self._max_size:
                self._full.set()
            deadline = self._pending[0].enqueued + self._policy.fill_wait_s(queued, backlog)
            while len(self._pending) < self._max_size:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                self._full.clear()
                try:
                    await asyncio.wait_for(self._full.wait(), remaining)
                except TimeoutError:
                    break
            await self._slots.acquire()
            # Records that queued while every batch slot was taken are already late:
            # the size is decided again now, with them counted.
            self._max_size = self._policy.size_limit(len(self._pending), self._backlog())
            batch = self._pending[: self._max_size]
            del self._pending[: self._max_size]
            if len(self._pending) < self._max_size:
                self._full.clear()
            if not self._pending:
                self._nonempty.clear()
            if self._on_dispatch is not None:
                self._on_dispatch(
                    BatchInfo(len(batch), loop.time() - batch[0].enqueued, self._max_size)
                )
            task = asyncio.create_task(self._execute(batch), name="batch")
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _execute(self, batch: list[_Item[T, R]]) -> None:
        try:
            results = await self._run_batch([item.value for item in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"batch of {len(batch)} returned {len(results)} results")
        except Exception as exc:
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(exc)
        else:
            for item, result in zip(batch, results, strict=False):
                if not item.future.done():
                    item.future.set_result(result)
        finally:
            self._slots.release()
