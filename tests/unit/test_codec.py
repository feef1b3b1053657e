"""The process boundary: what a worker raises reaches the owner as a ``StreamerError``.

Finding 2 of issue 10: only ``classify`` was wrapped, so any other exception in a
worker came back as a plain ``RuntimeError`` (or broke the owner's unpickling), which
the engine does not catch and the service stops on; and a worker whose every request
failed was never recycled. The first tests run real spawned workers.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import struct

import pytest

from streamer.errors import (
    DecodeError,
    InferenceFailed,
    RecordError,
    RetriesExhausted,
    StreamerError,
    WorkerCrashed,
    WorkerError,
)
from streamer.metrics import Metrics
from streamer.workers import codec
from streamer.workers.child import EXIT_RECYCLE, MAX_CONSECUTIVE_FAILURES
from streamer.workers.pool import WorkerPool
from tests.unit import codec_workers

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def pool():
    pool = WorkerPool("inference", 1, codec_workers.main, lambda i: (), Metrics(), 60)
    await pool.start()
    try:
        yield pool
    finally:
        await pool.stop()


async def _call(pool: WorkerPool, body: str) -> object:
    return await asyncio.wait_for(pool.submit(body), 30)


async def test_an_unknown_exception_arrives_as_a_retriable_streamer_error(pool) -> None:
    with pytest.raises(StreamerError) as info:
        await _call(pool, "unknown")
    assert isinstance(info.value, WorkerError) and info.value.retriable
    assert "KeyError" in str(info.value)
    assert await _call(pool, "ok") == "fine"  # the worker lives on


async def test_an_exception_pickle_cannot_rebuild_still_arrives(pool) -> None:
    with pytest.raises(WorkerError) as info:
        await _call(pool, "unpicklable-error")
    assert "NeedsTwoArguments: device lost (7)" in str(info.value)
    assert await _call(pool, "ok") == "fine"


async def test_a_result_that_cannot_be_sent_is_an_error_reply(pool) -> None:
    worker = pool.workers[0]
    with pytest.raises(WorkerError):
        await _call(pool, "unpicklable-result")
    assert pool.workers[0] is worker and await _call(pool, "ok") == "fine"


async def test_a_worker_that_keeps_failing_recycles_itself(pool) -> None:
    """A sticky device error: every request fails. After MAX_CONSECUTIVE_FAILURES the
    worker exits with EXIT_RECYCLE and the pool starts a fresh one."""
    first = pool.workers[0]
    for _ in range(MAX_CONSECUTIVE_FAILURES):
        with pytest.raises(WorkerError, match="illegal memory access"):
            await _call(pool, "always-fails")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while not (pool.running and pool.workers[0] is not first):
        assert loop.time() < deadline, "the failing worker was not recycled"
        await asyncio.sleep(0.05)
    assert first.exitcode == EXIT_RECYCLE
    assert await _call(pool, "ok") == "fine"


async def test_input_errors_do_not_count_towards_recycling() -> None:
    wire = codec.to_wire(DecodeError("bad", reason="corrupt"))
    rebuilt = codec.from_wire(wire, "decode")
    assert isinstance(rebuilt, DecodeError)
    assert (rebuilt.reason, rebuilt.stage, str(rebuilt)) == ("corrupt", "decode", "bad")


@pytest.mark.parametrize(
    ("error", "expected", "retriable"),
    [
        (InferenceFailed("CUDA out of memory"), InferenceFailed, True),
        (WorkerCrashed("decode", -9), WorkerError, True),  # other constructor arguments
        (
            RetriesExhausted(InferenceFailed("x"), stage="inference", attempts=3),
            RecordError,
            False,
        ),
        (MemoryError(), WorkerError, True),
        (ZeroDivisionError("division by zero"), WorkerError, True),
    ],
)
def test_every_error_maps_into_the_error_tree(
    error: BaseException, expected: type, retriable: bool
) -> None:
    wire = codec.to_wire(error)
    rebuilt = codec.from_wire(wire, "inference")
    assert type(rebuilt) is expected
    assert rebuilt.retriable is retriable
    if isinstance(error, RecordError):  # a dead letter's reason and stage survive the trip
        assert (rebuilt.reason, rebuilt.stage) == (error.reason, error.stage)


class _Exploit:
    def __reduce__(self):  # what a compromised decode worker could send its owner
        return (os.system, ("echo pwned",))


def test_the_owner_refuses_a_reply_that_would_run_code() -> None:
    data = pickle.dumps((1, True, _Exploit()))
    with pytest.raises(codec.ProtocolError, match=r"(posix|os)\.system"):
        codec.unpack_reply(data)


async def test_a_reply_frame_over_the_limit_is_refused_before_it_is_read() -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(struct.pack("!I", codec.MAX_FRAME_BYTES + 1))
    with pytest.raises(codec.ProtocolError):
        await codec.read_reply(reader)


def test_a_request_round_trips_through_the_worker_side_reader() -> None:
    read_fd, write_fd = os.pipe()
    try:
        codec.write_frame(write_fd, codec.pack((3, (1, 2, False))))
        assert codec.read_request(read_fd) == (3, (1, 2, False))
        os.close(write_fd)
        write_fd = -1
        with pytest.raises(EOFError):
            codec.read_request(read_fd)
    finally:
        os.close(read_fd)
        if write_fd >= 0:
            os.close(write_fd)


def test_the_replies_workers_send_pass_the_restricted_unpickler() -> None:
    from streamer.vision.classifier import BatchResult

    result = BatchResult([[1]], [[0.5]], 0.01, cpu_decode=(0,))
    for reply in [(7, True, result), (8, False, codec.to_wire(KeyError("k"))), ("ready", True, {})]:
        assert codec.unpack_reply(pickle.dumps(reply)) == reply
