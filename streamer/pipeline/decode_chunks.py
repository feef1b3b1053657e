"""Decode requests made in the same event-loop turn travel to the decode workers together.

One pipe round trip per record costs the event loop more than the decode itself
when the decode is cheap (a JPEG only probed for the device, or ``null_decode``):
a pickled request, a write, a reply to read and a future to resolve each time.
``DecodeChunks.submit`` keeps the per-record call the engine makes, and sends
every request submitted in one turn of the loop (the records of one fetch start
in the same turn) as a few chunks: one per running decode worker, at most
``max_chunk`` records each.

A decode worker answers a chunk with one ``(ok, value)`` per request, in order:
``(True, (seconds, orientation))`` or ``(False, WireError)`` for an input it
rejected. Each request's future gets its own answer, so one bad image fails
only itself. The chunk is sent with the shape of that reply (``ChunkReply``), so
the worker's process checks it before it gets here: a reply of any other shape
kills the worker, and the chunk fails as if the worker had died.

A chunk that fails as a whole (the worker died, hung, or raised something that is
not about an input) may have been failed by any of its records. Each of them is
then sent again alone, so the innocent ones are decoded and the culprit's own
failure becomes its result; the engine counts that as one attempt. A chunk
failure is no attempt of anybody's. This mirrors how the engine isolates a
record that fails an inference batch. A chunk has the deadline of one request
(``worker_timeout_s``): a chunk of slow but valid images that misses it is killed
as hung and re-sent the same way, each record with a deadline of its own.

Invariant: every request's future is settled (a result, an error, or cancelled
when the engine stops); nothing a chunk's reply holds can leave one waiting.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from streamer.errors import StreamerError
from streamer.workers import codec
from streamer.workers.codec import ProtocolError

# A request: (slot, payload length, defer_jpeg). A result: (seconds, orientation).
Request = tuple[int, int, bool]
Result = tuple[float, int]

MAX_CHUNK = 8  # records per chunk: enough to spread the round trip, small enough to pipeline


class Pool(Protocol):
    @property
    def running(self) -> list[Any]: ...

    async def submit(self, body: Any, timeout_s: float | None = None) -> Any: ...


class DecodeChunks:
    """The engine's decode stage: ``submit`` one request, answered from a chunk."""

    def __init__(self, pool: Pool, max_chunk: int = MAX_CHUNK) -> None:
        self.pool = pool
        self.max_chunk = max_chunk
        self._pending: list[tuple[Request, asyncio.Future[Result]]] = []
        self._tasks: set[asyncio.Task[None]] = set()  # chunks in flight (strong references)

    async def submit(self, request: Request) -> Result:
        """Decode one payload; raises what the worker raised for it (module docstring)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Result] = loop.create_future()
        if not self._pending:
            loop.call_soon(self._flush)  # after every request of this turn is in
        self._pending.append((request, future))
        return await future

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        for chunk in self.chunks(pending, len(self.pool.running), self.max_chunk):
            task = asyncio.create_task(self._run(chunk), name="decode-chunk")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        """Cancel the chunks in flight (their records' futures are cancelled)."""
        for _, future in self._pending:
            future.cancel()
        self._pending = []
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    @staticmethod
    def chunks(items: list[Any], workers: int, max_chunk: int) -> list[list[Any]]:
        """``items`` split in order into the fewest near-equal chunks of at most
        ``max_chunk`` that still give each of ``workers`` workers one."""
        if not items:
            return []
        count = min(len(items), max(workers, 1, math.ceil(len(items) / max_chunk)))
        size, extra = divmod(len(items), count)
        out, start = [], 0
        for i in range(count):
            end = start + size + (1 if i < extra else 0)
            out.append(items[start:end])
            start = end
        return out

    async def _run(self, chunk: list[tuple[Request, asyncio.Future[Result]]]) -> None:
        waiting = [(r, f) for r, f in chunk if not f.done()]  # a cancelled record waits no more
        if not waiting:
            return
        requests = [request for request, _ in waiting]
        try:
            answers = await self.pool.submit(codec.Request(requests, ChunkReply(requests)))
            for (_, future), answer in zip(waiting, answers, strict=True):
                if isinstance(answer, BaseException):
                    _settle(future, exception=answer)
                else:
                    _settle(future, result=answer)
        except StreamerError as exc:
            if len(waiting) == 1:
                _settle(waiting[0][1], exception=exc)
                return
            # Any of them may have caused it: each alone, so only the culprit fails.
            await asyncio.gather(*(self._run([item]) for item in waiting))
        except asyncio.CancelledError:  # the engine stops: nobody waits for these any more
            for _, future in waiting:
                future.cancel()
            raise
        except Exception as exc:  # a bug: the records fail loudly rather than wait forever
            for _, future in waiting:
                _settle(future, exception=exc)


@dataclass(frozen=True)
class ChunkReply:
    """The reply a chunk must get (``codec.Request``): one answer per request, in order,
    ``(True, (seconds, orientation))`` or ``(False, WireError)``. Orientation 0: the
    pixels are in the slot; 1-8: a JPEG left for the device, which only a request with
    ``defer_jpeg`` may get. Checked to ``(seconds, orientation)`` or the rebuilt error."""

    requests: Sequence[Request]

    def check(self, value: Any) -> list[Result | StreamerError]:
        answers: list[Result | StreamerError] = []
        replies = codec.sized(value, len(self.requests), "decode answers")
        for (_, _, defer_jpeg), answer in zip(self.requests, replies, strict=True):
            if not codec.pair(answer) or type(answer[0]) is not bool:
                raise ProtocolError(f"a decode answer of type {type(answer).__name__}")
            ok, result = answer
            if not ok:
                answers.append(codec.from_wire(result, "decode"))
                continue
            if not codec.pair(result):
                raise ProtocolError(f"a decode result of type {type(result).__name__}")
            orientation = result[1]
            if type(orientation) is not int or not 0 <= orientation <= (8 if defer_jpeg else 0):
                raise ProtocolError(f"orientation {codec.brief(orientation)}, defer={defer_jpeg}")
            answers.append((codec.seconds(result[0], "decode seconds"), orientation))
        return answers


def _settle(
    future: asyncio.Future[Result],
    result: Result | None = None,
    exception: BaseException | None = None,
) -> None:
    if future.done():
        return
    if exception is not None:
        future.set_exception(exception)
    else:
        assert result is not None
        future.set_result(result)
