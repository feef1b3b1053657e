"""One worker process, seen from the main process: start, call, stop, notice its death.

Requests and replies travel over two one-way pipes in ``workers.codec``'s frames
(slot indices, lengths, timings; never pixels). The worker side is
``workers.child``. The main process never blocks: replies are read by an asyncio
``StreamReader`` on the pipe's file descriptor, and requests are written through
an asyncio write transport that buffers instead of blocking. An error reply is
rebuilt by ``codec.from_wire``, so the caller only ever sees a ``StreamerError``.

If the process dies, every request it held fails with ``WorkerCrashed`` and the
``on_exit`` callback tells the owner, which decides what to do (respawn, retry).

A process can also hang without dying (a deadlock, a stuck driver call), which
no pipe notices. A watchdog therefore pings an idle worker and kills a worker
whose oldest request (ping or real) has gone unanswered for ``hang_timeout_s``;
from there it is an ordinary death.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import multiprocessing as mp
import os
from collections.abc import Callable
from typing import Any

from streamer.errors import StreamerError, WorkerCrashed
from streamer.workers import codec
from streamer.workers.child import child_main
from streamer.workers.environment import environment_without_credentials

log = logging.getLogger(__name__)

_SPAWN = mp.get_context("spawn")


class WorkerState(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


class WorkerStartError(StreamerError):
    """The worker process failed before it reported ready."""


# ---------------------------------------------------------------- owner side


class WorkerProcess:
    """Owns one spawned worker: start, call, stop, and notice its death."""

    def __init__(
        self,
        kind: str,
        index: int,
        target: Callable[..., None],
        args: tuple[Any, ...],
        on_exit: Callable[[WorkerProcess], None] | None = None,
        hang_timeout_s: float | None = None,
        role: str = "",
    ) -> None:
        self.kind = kind
        self.index = index
        self.name = f"{kind}-{index}{role}"
        self.state = WorkerState.STOPPED
        self.hung = False  # killed by the watchdog
        self._hang_timeout_s = hang_timeout_s
        self._sent_at: dict[int, float] = {}
        self._last_reply = 0.0
        self._watchdog: asyncio.Task[None] | None = None
        self.ready_info: Any = None
        self._target = target
        self._args = args
        self._on_exit = on_exit
        self._process: mp.process.BaseProcess | None = None
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._ids = itertools.count()
        self._reader_task: asyncio.Task[None] | None = None
        self._writer: asyncio.WriteTransport | None = None
        self._read_transport: asyncio.ReadTransport | None = None
        self._ready: asyncio.Future[Any] | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def load(self) -> int:
        return len(self._pending)

    @property
    def exitcode(self) -> int | None:
        return self._process.exitcode if self._process else None

    async def start(self, timeout_s: float) -> None:
        loop = asyncio.get_running_loop()
        req_read, req_write = _SPAWN.Pipe(duplex=False)
        rep_read, rep_write = _SPAWN.Pipe(duplex=False)
        self.state = WorkerState.STARTING
        self._process = _SPAWN.Process(
            target=child_main,
            args=(
                self._target,
                logging.getLogger().getEffectiveLevel(),
                req_read,
                rep_write,
                *self._args,
            ),
            name=f"streamer-{self.name}",
            daemon=True,
        )
        with environment_without_credentials():
            self._process.start()
        # The child has its own copies now; keep only our ends.
        req_read.close()
        rep_write.close()
        reader = asyncio.StreamReader(limit=2**26)
        read_file = os.fdopen(os.dup(rep_read.fileno()), "rb", buffering=0)
        write_file = os.fdopen(os.dup(req_write.fileno()), "wb", buffering=0)
        rep_read.close()
        req_write.close()
        try:
            self._read_transport, _ = await loop.connect_read_pipe(
                lambda: asyncio.StreamReaderProtocol(reader), read_file
            )
            self._writer, _ = await loop.connect_write_pipe(asyncio.Protocol, write_file)
            self._ready = loop.create_future()
            self._reader_task = asyncio.create_task(
                self._read_replies(reader), name=f"{self.name}-replies"
            )
            self.ready_info = await asyncio.wait_for(asyncio.shield(self._ready), timeout_s)
        except (TimeoutError, WorkerCrashed) as exc:
            assert self._ready is not None
            if self._ready.done() and not self._ready.cancelled():
                self._ready.exception()  # retrieved here, reported below
            await self.kill()
            raise WorkerStartError(f"{self.name} did not start: {exc}") from exc
        except asyncio.CancelledError:
            # e.g. the pool stops while a standby is starting, maybe before both pipe
            # ends had their transports: close the files no transport owns yet.
            self._abandon_start()
            read_file.close()
            write_file.close()
            raise
        self.state = WorkerState.RUNNING
        self._last_reply = loop.time()
        if self._hang_timeout_s is not None:
            self._watchdog = asyncio.create_task(self._watch(), name=f"{self.name}-watchdog")
        log.info("worker started worker=%s pid=%s", self.name, self.pid)

    def _abandon_start(self) -> None:
        """Synchronous cleanup of a cancelled start: nothing may be left running or open."""
        if self._process is not None and self._process.exitcode is None:
            self._process.kill()
        if self._reader_task is not None:
            self._reader_task.cancel()
        for transport in (self._read_transport, self._writer):
            if transport is not None:
                transport.close()
        self._read_transport = self._writer = None
        self.state = WorkerState.STOPPED

    def call(self, body: Any) -> asyncio.Future[Any]:
        """Send one request; the future gets the reply value or its error."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if self.state is not WorkerState.RUNNING or self._writer is None:
            future.set_exception(WorkerCrashed(self.kind, self.exitcode))
            return future
        request_id = next(self._ids)
        self._pending[request_id] = future
        self._sent_at[request_id] = asyncio.get_running_loop().time()
        self._send((request_id, body))
        return future

    async def _watch(self) -> None:
        """Ping when idle; kill the process when a request goes unanswered too long."""
        assert self._hang_timeout_s is not None
        timeout = self._hang_timeout_s
        loop = asyncio.get_running_loop()
        while self.state is WorkerState.RUNNING:
            await asyncio.sleep(min(1.0, timeout / 4))
            now = loop.time()
            if self._sent_at:
                waited = now - min(self._sent_at.values())
                if waited > timeout and self.state is WorkerState.RUNNING:
                    log.error(
                        "worker hung: no reply for %.1f s, killing worker=%s pid=%s",
                        waited,
                        self.name,
                        self.pid,
                    )
                    self.hung = True
                    if self._process is not None:
                        self._process.kill()  # the reader sees the pipe close and reaps
                    return
            elif now - self._last_reply > timeout / 2:
                self.call(codec.PING).add_done_callback(_ignore_outcome)

    def _send(self, message: Any) -> None:
        assert self._writer is not None
        self._writer.write(codec.pack(message))

    async def _read_replies(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                request_id, ok, value = await codec.read_reply(reader)
                self._last_reply = asyncio.get_running_loop().time()
                self._sent_at.pop(request_id, None)
                if request_id == codec.READY:
                    if self._ready and not self._ready.done():
                        self._ready.set_result(value)
                    continue
                future = self._pending.pop(request_id, None)
                if future is None or future.done():
                    continue
                if ok:
                    future.set_result(value)
                elif isinstance(value, codec.WireError):
                    future.set_exception(codec.from_wire(value, self.kind))
                else:
                    raise codec.ProtocolError(f"error reply of type {type(value).__name__}")
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the pipe closed: the process exited
        except codec.ProtocolError as exc:
            log.error("worker broke the protocol, killing worker=%s error=%s", self.name, exc)
            if self._process is not None:
                self._process.kill()
        finally:
            await self._reap()

    async def _reap(self) -> None:
        process = self._process
        if process is not None:
            # The pipe is closed, so the process is exiting; wait without blocking the loop.
            for _ in range(200):
                if process.exitcode is not None:
                    break
                await asyncio.sleep(0.01)
        expected = self.state in (WorkerState.STOPPING, WorkerState.STOPPED)
        self.state = WorkerState.STOPPED
        error = WorkerCrashed(self.kind, self.exitcode)
        for future in self._pending.values():
            if not future.done():
                future.set_exception(error)
        self._pending.clear()
        self._sent_at.clear()
        if self._watchdog is not None and self._watchdog is not asyncio.current_task():
            self._watchdog.cancel()
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(error)
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._read_transport is not None:
            self._read_transport.close()
            self._read_transport = None
        if not expected:
            log.error(
                "worker died worker=%s pid=%s exitcode=%s killed_as_hung=%s",
                self.name,
                self.pid,
                self.exitcode,
                self.hung,
            )
            if self._on_exit is not None:
                self._on_exit(self)

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Ask the worker to finish its queue and exit; kill it after ``timeout_s``."""
        if self._process is None or self.state is WorkerState.STOPPED:
            return
        self.state = WorkerState.STOPPING
        if self._writer is not None and not self._writer.is_closing():
            self._send(None)
        if self._reader_task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._reader_task), timeout_s)
            except TimeoutError:
                log.warning("worker did not stop in time, killing worker=%s", self.name)
                await self.kill()
        self.state = WorkerState.STOPPED

    async def kill(self) -> None:
        if self._process is not None and self._process.exitcode is None:
            self.state = WorkerState.STOPPING
            self._process.kill()
        if self._reader_task is not None:
            await asyncio.gather(self._reader_task, return_exceptions=True)
        self.state = WorkerState.STOPPED


def _ignore_outcome(future: asyncio.Future[Any]) -> None:
    """A ping's answer only matters through the watchdog's clock; mark errors retrieved."""
    if not future.cancelled():
        future.exception()
