"""The decode stage's chunks: one request per loop turn and worker, each record its own answer."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from streamer.errors import DecodeError, WorkerCrashed
from streamer.pipeline.decode_chunks import DecodeChunks
from streamer.workers import codec

pytestmark = pytest.mark.timeout(10)

BAD = 113  # a slot whose image the worker rejects
KILLER = 166  # a slot whose image kills the worker


class Pool:
    """Stands in for the decode pool and its workers' processes: answers like a decode
    worker (or with ``reply``), logging each chunk, and checks the answer against the
    chunk's declared shape as the process does, killing the worker when it does not fit."""

    def __init__(self, workers: int = 1, reply: Any = None) -> None:
        self.running = [object()] * workers
        self.chunks: list[list[tuple[int, int, bool]]] = []
        self.reply = reply

    async def submit(self, request: codec.Request, timeout_s: float | None = None) -> Any:
        body = request.body
        self.chunks.append(body)
        await asyncio.sleep(0)
        if any(slot == KILLER for slot, _, _ in body):
            raise WorkerCrashed("decode", -9)
        reply = self.reply
        if reply is None:
            reply = [
                (False, codec.to_wire(DecodeError("not an image", reason="unsupported-format")))
                if slot == BAD
                else (True, (0.001 * slot, 0))
                for slot, _, _ in body
            ]
        try:
            return request.reply.check(reply)
        except codec.ProtocolError:
            raise WorkerCrashed("decode", -9) from None


async def decode_all(chunks: DecodeChunks, slots: list[int]) -> list[Any]:
    return await asyncio.gather(
        *(chunks.submit((slot, 100, False)) for slot in slots), return_exceptions=True
    )


async def test_the_requests_of_one_loop_turn_travel_in_few_chunks_and_get_their_own_answers() -> (
    None
):
    pool = Pool(workers=1)
    results = await decode_all(DecodeChunks(pool, max_chunk=8), list(range(20)))

    assert [len(chunk) for chunk in pool.chunks] == [7, 7, 6]
    assert [slot for chunk in pool.chunks for slot, _, _ in chunk] == list(range(20))
    assert results == [(0.001 * slot, 0) for slot in range(20)]


async def test_each_running_worker_gets_a_chunk() -> None:
    pool = Pool(workers=3)
    await decode_all(DecodeChunks(pool, max_chunk=8), list(range(6)))
    assert [len(chunk) for chunk in pool.chunks] == [2, 2, 2]


async def test_requests_of_later_turns_go_in_later_chunks() -> None:
    pool = Pool(workers=1)
    chunks = DecodeChunks(pool)
    first = asyncio.ensure_future(decode_all(chunks, [1, 2]))
    await asyncio.sleep(0.01)
    second = await decode_all(chunks, [3])
    assert await first == [(0.001, 0), (0.002, 0)] and second == [(0.003, 0)]
    assert [[slot for slot, _, _ in chunk] for chunk in pool.chunks] == [[1, 2], [3]]


async def test_a_rejected_image_fails_only_itself() -> None:
    pool = Pool()
    results = await decode_all(DecodeChunks(pool), [1, BAD, 2])

    assert len(pool.chunks) == 1
    assert results[0] == (0.001, 0) and results[2] == (0.002, 0)
    assert isinstance(results[1], DecodeError) and results[1].reason == "unsupported-format"


async def test_a_chunk_that_kills_the_worker_is_sent_again_one_by_one() -> None:
    pool = Pool()
    results = await decode_all(DecodeChunks(pool), [1, KILLER, 2])

    # The chunk, then each record alone: the innocent ones are decoded.
    assert [[slot for slot, _, _ in chunk] for chunk in pool.chunks] == [
        [1, KILLER, 2],
        [1],
        [KILLER],
        [2],
    ]
    assert results[0] == (0.001, 0) and results[2] == (0.002, 0)
    assert isinstance(results[1], WorkerCrashed)


@pytest.mark.parametrize(
    "reply",
    [
        "not a list",
        [(True, (0.1, 0))] * 3,  # three answers for fewer requests
        [(True, (0.1, 0)), (True, "pixels")],
        [(True, (0.1, 0)), (False, "not a WireError")],
        [(True, (0.1, 0)), (False, codec.WireError(1, "bad", True))],  # type: ignore[arg-type]
    ],
)
async def test_a_malformed_reply_is_the_workers_fault(reply: Any) -> None:
    """It kills the worker (the process's check): the chunk fails as in a crash, and each
    record is sent again alone."""
    pool = Pool(reply=reply)
    results = await decode_all(DecodeChunks(pool), [1, 2])

    assert len(pool.chunks) == 3  # the chunk, then each alone
    assert all(isinstance(result, WorkerCrashed) for result in results)


async def test_answers_that_do_not_fit_the_chunk_never_leave_a_record_waiting() -> None:
    class TooFew(Pool):
        async def submit(self, request: codec.Request, timeout_s: float | None = None) -> Any:
            return [(0.001, 0)]  # a bug: one answer for a chunk of three

    results = await asyncio.wait_for(decode_all(DecodeChunks(TooFew()), [1, 2, 3]), 5)
    assert results[0] == (0.001, 0)
    assert all(isinstance(result, ValueError) for result in results[1:])


async def test_a_record_no_longer_waiting_is_not_sent() -> None:
    pool = Pool()
    chunks = DecodeChunks(pool)
    gone = asyncio.ensure_future(chunks.submit((1, 100, False)))
    kept = asyncio.ensure_future(chunks.submit((2, 100, False)))
    await asyncio.sleep(0)  # both submitted in this turn
    gone.cancel()
    assert await kept == (0.002, 0)
    assert [[slot for slot, _, _ in chunk] for chunk in pool.chunks] == [[2]]


@pytest.mark.parametrize(
    ("items", "workers", "max_chunk", "sizes"),
    [
        (0, 2, 8, []),
        (1, 4, 8, [1]),
        (5, 0, 8, [5]),  # no worker running yet: the pool queues it
        (17, 1, 8, [6, 6, 5]),
        (17, 4, 8, [5, 4, 4, 4]),
        (64, 2, 8, [8] * 8),
    ],
)
def test_chunk_sizes(items: int, workers: int, max_chunk: int, sizes: list[int]) -> None:
    chunks = DecodeChunks.chunks(list(range(items)), workers, max_chunk)
    assert [len(chunk) for chunk in chunks] == sizes
    assert [i for chunk in chunks for i in chunk] == list(range(items))


async def test_an_unexpected_error_fails_the_records_instead_of_leaving_them_waiting() -> None:
    class Broken(Pool):
        async def submit(self, body: Any, timeout_s: float | None = None) -> Any:
            raise RuntimeError("a bug")

    results = await decode_all(DecodeChunks(Broken()), [1, 2])
    assert all(isinstance(result, RuntimeError) for result in results)


async def test_stop_cancels_the_chunks_in_flight() -> None:
    class Stuck(Pool):
        async def submit(self, body: Any, timeout_s: float | None = None) -> Any:
            await asyncio.sleep(3600)

    chunks = DecodeChunks(Stuck())
    waiting = asyncio.ensure_future(chunks.submit((1, 100, False)))
    await asyncio.sleep(0.01)  # the chunk is in flight
    await chunks.stop()
    with pytest.raises(asyncio.CancelledError):
        await waiting
