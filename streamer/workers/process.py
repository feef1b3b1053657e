"""One worker process, seen from the main process: start, call, stop, notice its death.

Requests and replies travel over two one-way pipes in ``workers.codec``'s frames
(slot indices, lengths, timings; never pixels); ``workers.spawn`` starts the
process, ``workers.child`` is its side. The main process never blocks: replies
are read by an asyncio ``StreamReader`` on the pipe's file descriptor, and
requests are written through an asyncio write transport that buffers instead of
blocking.

The worker is untrusted (it parses hostile bytes): ``codec`` checks each reply
before its caller sees it, the id included (a worker serves one request at a time,
so a reply answers the oldest pending one), and a result against the shape its
request declared (``codec.Request``); an error is rebuilt by ``codec.from_wire``, so
a caller only ever sees a ``StreamerError``. A reply that fails the check, or makes
the reader raise at all, kills the worker, and its requests (the one answered too)
fail as after any death: the reader never ends with its process left running.

If the process dies, every request it held fails with ``WorkerCrashed`` and the
``on_exit`` callback tells the owner, which decides what to do (respawn, retry).
``on_exit`` is only called for a worker that was RUNNING: a death while starting
makes ``start`` raise ``WorkerStartError`` instead, so the owner hears of each
death once. A worker that exits with ``child.EXIT_RECYCLE`` is logged as
recycled, not as a crash; for the owner it is a death like any other.

A process can also hang without dying (a deadlock, a stuck driver call), which
no pipe notices. Every request has a time limit (its own ``timeout_s``, else
``hang_timeout_s``; none if both are None), counted from when the worker gets to
it, and a watchdog (``workers.watchdog``) kills the worker once the request in
service runs out of time: that request fails with ``WorkerCrashed(hung=True)``,
the others queued behind it with ``hung=False``.
From there it is an ordinary death. An idle worker is pinged every
``hang_timeout_s / 2`` so that a hang is found before work is sent to it.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import multiprocessing as mp
import time
from collections.abc import Callable
from typing import Any

from streamer.errors import StreamerError, WorkerCrashed
from streamer.workers import codec
from streamer.workers.child import EXIT_RECYCLE
from streamer.workers.spawn import spawn
from streamer.workers.watchdog import Watchdog

log = logging.getLogger(__name__)


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
        self.served = False  # answered a request (pings do not count)
        self.started_at: float | None = None  # time.monotonic() when it reported ready
        self.exited_at: float | None = None
        self._watchdog = Watchdog(hang_timeout_s)
        self._watch_task: asyncio.Task[None] | None = None
        self.ready_info: Any = None
        self._target = target
        self._args = args
        self._on_exit = on_exit
        self._process: mp.process.BaseProcess | None = None
        # request id -> (its caller's future, the shape its reply must have), in send order
        self._pending: dict[int, tuple[asyncio.Future[Any], codec.ReplyShape]] = {}
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

    def proved_healthy(self, after_s: float) -> bool:
        """Answered a request, or was up (RUNNING) for ``after_s``."""
        if self.served:
            return True
        if self.started_at is None:
            return False
        end = self.exited_at if self.exited_at is not None else time.monotonic()
        return end - self.started_at >= after_s

    async def start(self, timeout_s: float) -> None:
        loop = asyncio.get_running_loop()
        self.state = WorkerState.STARTING
        self._process, read_file, write_file = spawn(self.name, self._target, self._args)
        reader = asyncio.StreamReader(limit=2**26)
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
        if self.state is not WorkerState.STARTING:  # reaped between its ready and now
            raise WorkerStartError(f"{self.name} exited as it started (exit code {self.exitcode})")
        self.state = WorkerState.RUNNING
        self.started_at = time.monotonic()
        self._watch_task = asyncio.create_task(self._watch(), name=f"{self.name}-watchdog")
        log.info("worker started worker=%s pid=%s", self.name, self.pid)

    def _abandon_start(self) -> None:
        """Synchronous cleanup of a cancelled start: nothing may be left running or open."""
        if self._process is not None and self._process.exitcode is None:
            self._process.kill()
        if self._reader_task is not None:
            self._reader_task.cancel()
        self._close_pipes()
        self.state = WorkerState.STOPPED

    def _close_pipes(self) -> None:
        for transport in (self._read_transport, self._writer):
            if transport is not None:
                transport.close()
        self._read_transport = self._writer = None

    def call(self, body: Any, timeout_s: float | None = None) -> asyncio.Future[Any]:
        """Send one request (a ``codec.Request``: its body, the reply's shape declared);
        the future gets the checked reply value or its error.

        The worker is killed as hung if no reply came ``timeout_s`` after the send
        (default: the worker's ``hang_timeout_s``; None for both: no deadline).
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if self.state is not WorkerState.RUNNING or self._writer is None or self.hung:
            future.set_exception(WorkerCrashed(self.kind, self.exitcode))
            return future
        if isinstance(body, codec.Request):
            body, reply = body.body, body.reply
        else:
            reply = codec.PingReply() if body is codec.PING else codec.AnyReply()
        request_id = next(self._ids)
        self._pending[request_id] = (future, reply)
        self._watchdog.sent(request_id, timeout_s, loop.time(), ping=body is codec.PING)
        self._send((request_id, body))
        return future

    async def _watch(self) -> None:
        """Kill the process once the request in service runs out of time; ping it when idle."""
        while self.state is WorkerState.RUNNING:
            in_service = await self._watchdog.due()
            if in_service is None:
                self.call(codec.PING).add_done_callback(_ignore_outcome)
                continue
            log.error(
                "worker hung: the request in service ran out of time, killing worker=%s pid=%s"
                " queued_behind=%d",
                self.name,
                self.pid,
                len(self._pending) - 1,
            )
            self.hung = True
            if self._process is not None:
                self._process.kill()  # the reader sees the pipe close and reaps
            return

    def _send(self, message: Any) -> None:
        assert self._writer is not None
        self._writer.write(codec.pack(message))

    async def _read_replies(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                self._take(*await codec.read_reply(reader))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the pipe closed: the process exited
        except Exception as exc:  # a ProtocolError, or anything else a reply made us raise
            unexpected = not isinstance(exc, codec.ProtocolError)  # then its traceback helps
            log.error(
                "worker broke the protocol, killing worker=%s error=%s",
                self.name,
                exc,
                exc_info=unexpected,
            )
            if self._process is not None and self._process.exitcode is None:
                self._process.kill()  # ``_reap`` waits for it and fails its requests
        finally:
            await self._reap()

    def _take(self, request_id: int | str, ok: bool, value: Any) -> None:
        """Hand one reply to its caller; ``ProtocolError`` if it answers no request in
        service or has the wrong shape (its request then fails in ``_reap``)."""
        now = asyncio.get_running_loop().time()
        if request_id == codec.READY:
            if not ok or self._ready is None or self._ready.done():
                raise codec.ProtocolError("a ready message that is not the first reply")
            self._watchdog.answered(request_id, now)
            self._ready.set_result(value)
            return
        in_service = next(iter(self._pending), None)
        if in_service is None or request_id != in_service:
            what = codec.brief(request_id)
            raise codec.ProtocolError(f"a reply to request {what}; in service: {in_service}")
        future, reply = self._pending[in_service]
        result_ok, result = codec.outcome(ok, value, reply, self.kind)
        del self._pending[in_service]
        if self._watchdog.answered(in_service, now):
            self.served = True
        if future.done():  # its caller gave up on it
            return
        if result_ok:
            future.set_result(result)
        else:
            future.set_exception(result)

    async def _reap(self) -> None:
        process = self._process
        if process is not None:
            # The pipe is closed, so the process is exiting; wait without blocking the loop.
            for _ in range(200):
                if process.exitcode is not None:
                    break
                await asyncio.sleep(0.01)
        # A death while starting is reported by ``start`` raising, not by ``on_exit``.
        noticed = self.state is WorkerState.RUNNING
        self.state = WorkerState.STOPPED
        self.exited_at = time.monotonic()
        exitcode = self.exitcode
        for request_id, (future, _) in self._pending.items():
            if not future.done():
                hung = request_id in self._watchdog.expired
                future.set_exception(WorkerCrashed(self.kind, exitcode, hung=hung))
        self._pending.clear()
        if self._watch_task is not None and self._watch_task is not asyncio.current_task():
            self._watch_task.cancel()
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(WorkerCrashed(self.kind, exitcode))
            # A start cancelled half way (the pool stopping) no longer awaits it.
            self._ready.exception()
        self._close_pipes()
        if not noticed:
            return
        if exitcode == EXIT_RECYCLE:
            log.warning("worker recycled itself worker=%s pid=%s", self.name, self.pid)
        else:
            log.error(
                "worker died worker=%s pid=%s exitcode=%s killed_as_hung=%s",
                self.name,
                self.pid,
                exitcode,
                self.hung,
            )
        if self._on_exit is not None:
            self._on_exit(self)

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Ask the worker to finish its queue and exit; kill it after ``timeout_s``."""
        if self._process is None:
            return
        if self.state is WorkerState.STOPPED:
            if self._process.exitcode is None:  # e.g. left by a cancelled start
                self._process.kill()
            if self._reader_task is not None:  # it reaps the process
                await asyncio.gather(self._reader_task, return_exceptions=True)
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
