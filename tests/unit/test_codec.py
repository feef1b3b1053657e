"""The process boundary: what a worker raises reaches the owner as a ``StreamerError``,
and what a worker answers is checked before the owner believes it.

Any exception a worker raises must come back mapped into the error tree (a plain
``RuntimeError`` would stop the service), and a worker whose every request fails
recycles itself. The first tests run real spawned workers.

Every reply is either well-formed (the envelope, an error's fields, a result of its
request's declared shape) or a ``ProtocolError``: never another exception, and never a
value that makes the owner's code raise later (a short top-k row, an index past the
model's classes, a NaN, a label value of the worker's choosing). The last tests feed
generated replies through the owner's checks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import math
import os
import pickle
import struct
from typing import Any

import pytest
from aiokafka import ConsumerRecord
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from streamer.config import Settings
from streamer.errors import (
    DEAD_LETTER_REASONS,
    STAGES,
    DecodeError,
    InferenceFailed,
    RecordError,
    RetriesExhausted,
    StreamerError,
    WorkerCrashed,
    WorkerError,
)
from streamer.kafka.records import dead_letter_headers
from streamer.metrics import Metrics
from streamer.pipeline.decode_chunks import ChunkReply
from streamer.pipeline.engine import Engine
from streamer.vision.classifier import BatchEntry, BatchReply, BatchResult
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


# ------------------------------------------------------------------ the owner's checks

ENTRIES = [BatchEntry(0), BatchEntry(1, 500, 6), BatchEntry(2)]  # the second left encoded
BATCH = BatchReply(ENTRIES, top_k=3, classes=10, devices=frozenset({"cpu", "cuda:0"}))
CHUNK = [(1, 10, False), (2, 10, True)]  # (slot, length, defer_jpeg)


def result(**changes: Any) -> BatchResult:
    honest = BatchResult([[0, 1, 2]] * 3, [[0.5, 0.3, 0.2]] * 3, 0.01, handled_s=0.02)
    return dataclasses.replace(honest, **changes)


def with_fields(**fields: Any) -> BatchResult:
    """A BatchResult with exactly these attributes, as a hostile pickle can build one."""
    made = object.__new__(BatchResult)
    vars(made).update(fields)
    return made


def test_a_batch_result_that_fits_its_batch_is_accepted() -> None:
    for good in (result(), result(cpu_decode=(1,), device="cuda:0", device_memory_bytes=7)):
        assert BATCH.check(good) is good


BAD_RESULTS = {
    "a row short": result(scores=[[0.5, 0.3, 0.2]] * 2),
    "a row too many": result(indices=[[0, 1, 2]] * 4),
    "a top-k row short": result(scores=[[0.5, 0.3]] * 3),
    "a top-k row too long": result(indices=[[0, 1, 2, 3]] * 3),
    "an index past the classes": result(indices=[[0, 1, 10]] * 3),
    "a negative index": result(indices=[[0, 1, -1]] * 3),
    "a huge index": result(indices=[[0, 1, 10**400]] * 3),
    "a bool index": result(indices=[[True, 0, 2]] * 3),
    "a float index": result(indices=[[0.0, 1, 2]] * 3),
    "a class twice": result(indices=[[0, 0, 1]] * 3),
    "a NaN score": result(scores=[[math.nan, 0.3, 0.2]] * 3),
    "an infinite score": result(scores=[[math.inf, 0.3, 0.2]] * 3),
    "a score above 1": result(scores=[[1.5, 0.3, 0.2]] * 3),
    "an int score": result(scores=[[1, 0.3, 0.2]] * 3),
    "rows as tuples": result(scores=[(0.5, 0.3, 0.2)] * 3),
    "a negative forward_s": result(forward_s=-0.1),
    "a NaN handled_s": result(handled_s=math.nan),
    "a huge handled_s": result(handled_s=10**400),
    "a timing as text": result(forward_s="0.1"),
    "a device of its own": result(device="cuda:7"),
    "a device that is no string": result(device=0),
    "negative memory": result(device_memory_bytes=-1),
    "huge memory": result(device_memory_bytes=2**70),
    "utilisation above 1": result(device_utilization=2.0),
    "NaN utilisation": result(device_utilization=math.nan),
    "cpu_decode past the batch": result(cpu_decode=(3,)),
    "cpu_decode of an entry that holds pixels": result(cpu_decode=(0,)),
    "cpu_decode twice": result(cpu_decode=(1, 1)),
    "cpu_decode as a list": result(cpu_decode=[1]),
    "cpu_decode unhashable": result(cpu_decode=([1],)),
    "no BatchResult": {"indices": [[0, 1, 2]] * 3},
    "a field missing": with_fields(indices=[[0, 1, 2]] * 3, scores=[[0.5, 0.3, 0.2]] * 3),
    "a field too many": with_fields(**vars(result()), extra=1),
}


@pytest.mark.parametrize("bad", BAD_RESULTS.values(), ids=BAD_RESULTS.keys())
def test_a_batch_result_that_does_not_fit_its_batch_is_a_protocol_error(bad: Any) -> None:
    # Through the owner's unpickler too: the pickle is what a worker actually sends.
    _, ok, value = codec.unpack_reply(pickle.dumps((4, True, bad)))
    with pytest.raises(codec.ProtocolError):
        codec.outcome(ok, value, BATCH, "inference")


def test_a_decode_chunk_reply_that_fits_is_checked_to_results_and_errors() -> None:
    rejected = codec.to_wire(DecodeError("bad", reason="corrupt"))
    answers = ChunkReply(CHUNK).check([(True, (0.01, 0)), (False, rejected)])
    assert answers[0] == (0.01, 0)
    assert isinstance(answers[1], DecodeError) and answers[1].reason == "corrupt"
    assert ChunkReply(CHUNK).check([(True, (0, 0)), (True, (0.02, 6))]) == [(0.0, 0), (0.02, 6)]


BAD_CHUNK_REPLIES = {
    "no list": "pixels",
    "an answer short": [(True, (0.01, 0))],
    "an answer too many": [(True, (0.01, 0))] * 3,
    "an answer as a list": [[True, (0.01, 0)], (True, (0.01, 0))],
    "ok as an int": [(1, (0.01, 0)), (True, (0.01, 0))],
    "a result of three": [(True, (0.01, 0, 0)), (True, (0.01, 0))],
    "an orientation for a request that did not defer": [(True, (0.01, 3)), (True, (0.01, 0))],
    "orientation 9": [(True, (0.01, 0)), (True, (0.01, 9))],
    "a negative orientation": [(True, (0.01, 0)), (True, (0.01, -1))],
    "a bool orientation": [(True, (0.01, 0)), (True, (0.01, True))],
    "NaN seconds": [(True, (math.nan, 0)), (True, (0.01, 0))],
    "negative seconds": [(True, (-1.0, 0)), (True, (0.01, 0))],
    "seconds as text": [(True, ("1", 0)), (True, (0.01, 0))],
    "an error that is no WireError": [(False, "bad"), (True, (0.01, 0))],
    "an error class that is no string": [(False, codec.WireError(1, "m", True)), (True, (0, 0))],  # type: ignore[arg-type]
    "a reason that is no string": [
        (False, codec.WireError("DecodeError", "m", False, 5, "decode")),  # type: ignore[arg-type]
        (True, (0.01, 0)),
    ],
}


@pytest.mark.parametrize("bad", BAD_CHUNK_REPLIES.values(), ids=BAD_CHUNK_REPLIES.keys())
def test_a_decode_chunk_reply_that_does_not_fit_is_a_protocol_error(bad: Any) -> None:
    with pytest.raises(codec.ProtocolError):
        ChunkReply(CHUNK).check(bad)


MALFORMED_ERRORS = {
    "class no string": codec.WireError(1, "m", True),  # type: ignore[arg-type]
    "message no string": codec.WireError("DecodeError", None, True),  # type: ignore[arg-type]
    "retriable no bool": codec.WireError("DecodeError", "m", 1),  # type: ignore[arg-type]
    "reason no string": codec.WireError("DecodeError", "m", False, 5, "decode"),  # type: ignore[arg-type]
    "stage no string": codec.WireError("DecodeError", "m", False, "corrupt", ["decode"]),  # type: ignore[arg-type]
    "message too long": codec.WireError("DecodeError", "m" * (codec.MAX_MESSAGE_CHARS + 1), True),
    "class name too long": codec.WireError("E" * 1000, "m", True),
    "a tuple, not a WireError": ("DecodeError", "m", False, "corrupt", "decode"),
}


@pytest.mark.parametrize("wire", MALFORMED_ERRORS.values(), ids=MALFORMED_ERRORS.keys())
def test_an_error_with_fields_of_the_wrong_type_or_length_is_a_protocol_error(wire: Any) -> None:
    with pytest.raises(codec.ProtocolError):
        codec.from_wire(wire, "decode")


UNKNOWN_ERRORS = {
    "a class outside the error tree": codec.WireError("Exploit", "m", False),
    "a name in the module that is no error": codec.WireError("STAGES", "m", False),
    "a reason of its own": codec.WireError("DecodeError", "m", False, "made-up", "decode"),
    "a stage of its own": codec.WireError("DecodeError", "m", False, "corrupt", "made-up"),
}


@pytest.mark.parametrize("wire", UNKNOWN_ERRORS.values(), ids=UNKNOWN_ERRORS.keys())
def test_an_error_naming_no_known_class_reason_or_stage_is_a_retriable_worker_error(
    wire: codec.WireError,
) -> None:
    rebuilt = codec.from_wire(wire, "decode")
    assert type(rebuilt) is WorkerError and rebuilt.retriable
    assert "made-up" not in (getattr(rebuilt, "reason", None), getattr(rebuilt, "stage", None))


def test_a_long_error_message_is_cut_before_it_crosses() -> None:
    wire = codec.to_wire(RuntimeError("x" * 100_000))
    assert len(wire.message) == codec.MAX_MESSAGE_CHARS
    assert isinstance(codec.from_wire(wire, "decode"), WorkerError)


MALFORMED_ENVELOPES = {
    "a float id": (1.0, True, None),
    "a bool id": (True, True, None),
    "an unhashable id": ([1], True, None),
    "no id": (None, True, None),
    "a string id": ("readyy", True, None),
    "ok as an int": (1, 1, None),
    "a list": [1, True, None],
    "two items": (1, True),
    "four items": (1, True, None, None),
}


@pytest.mark.parametrize("message", MALFORMED_ENVELOPES.values(), ids=MALFORMED_ENVELOPES.keys())
def test_a_reply_envelope_other_than_id_ok_value_is_a_protocol_error(message: Any) -> None:
    with pytest.raises(codec.ProtocolError):
        codec.unpack_reply(pickle.dumps(message))


# ------------------------------------------------------------------ generated replies

scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-2, max_value=12)
    | st.floats()
    | st.floats(min_value=0.0, max_value=1.0)
    | st.text(max_size=8)
    | st.binary(max_size=8)
    | st.sampled_from(
        (
            *DEAD_LETTER_REASONS,
            *STAGES,
            *codec.KNOWN_ERRORS,
            "cpu",
            "cuda:0",
            "cuda:9",
            "x" * (codec.MAX_NAME_CHARS + 1),
        )
    )
)
wire_errors = st.builds(codec.WireError, scalars, scalars, scalars, scalars, scalars)
anything = st.recursive(
    scalars | wire_errors,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.tuples(inner, inner)
        | st.dictionaries(st.text(max_size=3), inner, max_size=2)
    ),
    max_leaves=8,
)
seconds = st.floats(min_value=0.0, max_value=100.0)


def mutated(draw: st.DrawFn, value: Any) -> Any:
    """``value`` (well-formed) with up to two parts replaced by anything at all: a field,
    an item of a list, an item of a tuple, at any depth."""
    for _ in range(draw(st.integers(0, 2))):
        value = _replace_part(draw, value)
    return value


def _replace_part(draw: st.DrawFn, value: Any) -> Any:
    if isinstance(value, BatchResult):
        name = draw(st.sampled_from(sorted(vars(value))))
        return dataclasses.replace(value, **{name: _replace_part(draw, getattr(value, name))})
    if isinstance(value, list | tuple) and value and draw(st.booleans()):
        i = draw(st.integers(0, len(value) - 1))
        items = [*value[:i], _replace_part(draw, value[i]), *value[i + 1 :]]
        return type(value)(items) if type(value) in (list, tuple) else type(value)(*items)
    return draw(anything)


@st.composite
def batch_results(draw: st.DrawFn) -> Any:
    """A BatchResult for ``ENTRIES`` at ``BATCH``'s top-k, then perhaps mutated."""
    top = st.lists(st.integers(0, BATCH.classes - 1), min_size=3, max_size=3, unique=True)
    good = BatchResult(
        [draw(top) for _ in ENTRIES],
        [draw(st.lists(st.floats(0.0, 1.0), min_size=3, max_size=3)) for _ in ENTRIES],
        draw(seconds),
        draw(st.sampled_from(sorted(BATCH.devices))),
        draw(st.none() | st.integers(0, 2**40)),
        draw(st.none() | st.floats(0.0, 1.0)),
        draw(st.sampled_from([(), (1,)])),
        draw(seconds),
    )
    return mutated(draw, good)


known_wire_errors = st.builds(
    codec.WireError,
    st.sampled_from(sorted(codec.KNOWN_ERRORS)),
    st.text(max_size=20),
    st.booleans(),
    st.none() | st.sampled_from(DEAD_LETTER_REASONS),
    st.none() | st.sampled_from(STAGES),
)


@st.composite
def error_replies(draw: st.DrawFn) -> Any:
    """A well-formed error description, then perhaps mutated."""
    return mutated(draw, draw(known_wire_errors))


@st.composite
def chunk_answers(draw: st.DrawFn) -> Any:
    """A decode chunk's answers for ``CHUNK``, then perhaps mutated."""
    error = known_wire_errors
    good = [
        draw(
            st.tuples(st.just(True), st.tuples(seconds, st.just(0)))
            | st.tuples(st.just(False), error)
        ),
        draw(
            st.tuples(st.just(True), st.tuples(seconds, st.integers(0, 8)))
            | st.tuples(st.just(False), error)
        ),
    ]
    return mutated(draw, good)


@functools.cache
def engine() -> Engine:
    return Engine(Settings(weights="random:0", device="cpu", top_k=3), Metrics())


def assert_fixed_labels(error: StreamerError) -> None:
    """A rebuilt error is one of the tree's, and a dead letter made of it can be written."""
    assert isinstance(error, StreamerError)
    if isinstance(error, RecordError):
        assert error.reason in DEAD_LETTER_REASONS and error.stage in STAGES
        record = ConsumerRecord("in", 0, 1, 1000, 0, b"k", b"v", None, 0, 0, ())
        dead_letter_headers(record, error)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ok=st.booleans(), value=batch_results() | chunk_answers() | error_replies() | anything)
def test_any_reply_is_either_well_formed_or_a_protocol_error(ok: bool, value: Any) -> None:
    """Whatever a worker sends, the owner's checks accept it as well-formed or raise
    ``ProtocolError``; an accepted reply is safe for the code that reads it next."""
    for shape, kind in ((BATCH, "inference"), (ChunkReply(CHUNK), "decode")):
        try:
            _, sent_ok, sent = codec.unpack_reply(pickle.dumps((3, ok, value)))
            accepted, checked = codec.outcome(sent_ok, sent, shape, kind)
        except codec.ProtocolError:
            event(f"{kind}: a protocol error")
            continue
        event(f"{kind}: accepted {'a result' if accepted else 'an error'}")
        if not accepted:
            assert_fixed_labels(checked)
        elif isinstance(shape, BatchReply):
            items = engine()._items(list(ENTRIES), checked, dispatched_at=0.0)
            assert len(items) == len(ENTRIES)
            assert checked.device in shape.devices
        else:
            for answer in checked:
                if isinstance(answer, StreamerError):
                    assert_fixed_labels(answer)
                else:
                    seconds, orientation = answer
                    assert type(seconds) is float and math.isfinite(seconds) and seconds >= 0
                    assert type(orientation) is int and 0 <= orientation <= 8


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=300) | st.builds(pickle.dumps, anything))
def test_any_frame_payload_is_a_reply_or_a_protocol_error(data: bytes) -> None:
    try:
        request_id, ok, _ = codec.unpack_reply(data)
    except codec.ProtocolError:
        return
    assert type(ok) is bool
    assert type(request_id) is int or request_id == codec.READY
