"""The one wire format between the service and its worker processes, and the owner's
check of everything a worker sends.

Both ends use this module: the worker with blocking reads and writes on its pipe
file descriptors, the main process with an asyncio ``StreamReader`` and a write
transport. A frame is a 4-byte big-endian length, then a pickle of one message:

* request  ``(request_id, body)``: the body is the work (slot indices, lengths;
  never pixels), ``PING`` (answered by the loop itself) or ``None`` (stop);
* reply    ``(request_id, True, result)`` or ``(request_id, False, WireError)``;
  the first reply of every worker is ``(READY, True, ready_info)``.

Errors cross as a ``WireError`` description, never as an exception object:
``to_wire`` maps whatever a worker raised into the project's error tree first
(a ``StreamerError`` keeps its class, reason and stage; anything else becomes a
retriable ``WorkerError``), and ``from_wire`` rebuilds it on the owner's side.

Workers parse hostile bytes and the main process holds the credentials, so the
owner believes nothing a worker sends before this module checked it:

1. the frame: at most ``MAX_FRAME_BYTES``, unpickled by an unpickler that builds
   builtins and the classes of ``_REPLY_CLASSES`` only;
2. the envelope (``unpack_reply``): a 3-tuple, the id an ``int`` or ``READY``, ``ok``
   a ``bool``; ``WorkerProcess`` also requires the id of the request in service (a
   worker answers its requests one at a time, in order);
3. an error (``from_wire``): a ``WireError`` of strings and a bool, each of bounded
   length. A class that is not in ``streamer.errors``, or a reason or stage outside
   ``DEAD_LETTER_REASONS`` and ``STAGES``, makes it a plain retriable ``WorkerError``;
4. a result: the shape its request declared (``Request``; the kinds declare theirs
   beside their types: ``decode_chunks.ChunkReply``, ``classifier.BatchReply``), with
   the exact types, lengths and ranges the request implies; a body sent without one
   may get any value of step 1.

Anything else raises ``ProtocolError``, and the worker that sent it is killed and
replaced: its requests fail as after a crash. So a metric label or dead-letter
header that a worker's reply decides (a reason, a stage, a device) is one of a fixed
set, and a reply of a declared shape cannot make the code that reads it raise.
(``ready_info``, sent once as a worker starts, before it has read any input, gets
steps 1 and 2 only.)
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import os
import pickle
import struct
from typing import Any, NamedTuple, Protocol

from streamer import errors
from streamer.errors import RecordError, StreamerError, WorkerError

HEADER = struct.Struct("!I")
MAX_FRAME_BYTES = 64 * 1024 * 1024  # replies are top-k lists; a bigger frame is a broken worker
READY = "ready"  # the request id of a worker's first reply
PING = "ping"  # a request body the worker loop answers itself: it is alive
MAX_MESSAGE_CHARS = 4000  # a WireError's message (``to_wire`` cuts longer ones)
MAX_NAME_CHARS = 64  # a WireError's class name, reason and stage
MAX_SECONDS = 86_400.0  # no request lives a day: a longer timing is no timing

# Classes (besides builtins) a reply may contain, by (module, name).
_REPLY_CLASSES = {
    ("streamer.vision.classifier", "BatchResult"),
    ("streamer.workers.codec", "WireError"),
}
# The errors a worker may name: the project's error tree, nothing else.
KNOWN_ERRORS: dict[str, type[StreamerError]] = {
    name: cls
    for name, cls in vars(errors).items()
    if isinstance(cls, type) and issubclass(cls, StreamerError)
}


class ProtocolError(StreamerError):
    """A worker sent something this codec does not accept: the worker is broken."""

    retriable = True


class WireError(NamedTuple):
    """An error as it crosses the pipe: the class name within ``streamer.errors``,
    the message, and for a ``RecordError`` its reason and stage."""

    type_name: str
    message: str
    retriable: bool
    reason: str | None = None
    stage: str | None = None


def to_wire(exc: BaseException) -> WireError:
    """Map what a worker raised to the project's error tree, as a description."""
    if isinstance(exc, RecordError):
        return WireError(type(exc).__name__, _cut(str(exc)), exc.retriable, exc.reason, exc.stage)
    if isinstance(exc, StreamerError):
        return WireError(type(exc).__name__, _cut(str(exc)), exc.retriable)
    # Unknown: a bug, or the device in a bad state. Retrying elsewhere may succeed.
    return WireError("WorkerError", _cut(f"{type(exc).__name__}: {exc}"), True)


def _cut(message: str) -> str:
    if len(message) <= MAX_MESSAGE_CHARS:
        return message
    return message[: MAX_MESSAGE_CHARS - 3] + "..."


def from_wire(wire: Any, kind: str) -> StreamerError:
    """The exception the owner raises for a worker's error description; ``ProtocolError``
    when ``wire`` is no well-formed ``WireError``."""
    if type(wire) is not WireError or len(wire) != len(WireError._fields):
        raise ProtocolError(f"an error reply of type {type(wire).__name__}")
    type_name, message, retriable, reason, stage = wire
    if not (
        text(type_name, MAX_NAME_CHARS)
        and text(message, MAX_MESSAGE_CHARS)
        and type(retriable) is bool
        and (reason is None or text(reason, MAX_NAME_CHARS))
        and (stage is None or text(stage, MAX_NAME_CHARS))
    ):
        raise ProtocolError(f"a malformed WireError {tuple(type(f).__name__ for f in wire)}")
    cls = KNOWN_ERRORS.get(type_name)
    known = (reason is None or reason in errors.DEAD_LETTER_REASONS) and (
        stage is None or stage in errors.STAGES
    )
    if cls is None or cls is WorkerError or not known:
        return WorkerError(kind, message)
    if issubclass(cls, RecordError):
        try:
            return cls(message, reason=reason, stage=stage)
        except TypeError:  # its own constructor: the base class keeps reason and stage
            return RecordError(message, reason=reason, stage=stage)
    try:
        return cls(message)
    except TypeError:  # a class with other constructor arguments: keep its meaning
        return WorkerError(kind, f"{type_name}: {message}", retriable=retriable)


# ------------------------------------------------------------------ reply shapes


class ReplyShape(Protocol):
    def check(self, value: Any) -> Any:
        """What the caller gets for ``value`` (it, or a checked copy); ``ProtocolError``
        when ``value`` does not have this shape."""


class AnyReply:
    """The shape of a body sent without a declared one: any value the unpickler built."""

    def check(self, value: Any) -> Any:
        return value


class PingReply:
    def check(self, value: Any) -> Any:
        if type(value) is not str or value != PING:
            raise ProtocolError(f"a ping answered with {type(value).__name__}")
        return value


@dataclasses.dataclass(frozen=True)
class Request:
    """A request body and the shape of the reply it must get; only the body is sent."""

    body: Any
    reply: ReplyShape = dataclasses.field(default_factory=AnyReply)


# Checks for the reply shapes the request kinds declare (``decode_chunks.ChunkReply``,
# ``classifier.BatchReply``): each is exact about types, since ``True == 1`` and
# ``1.0 == 1`` would let one value pass for another.


def sized(value: Any, length: int, what: str) -> list[Any]:
    """``value`` if it is a list of ``length`` items; ``ProtocolError`` otherwise."""
    if type(value) is not list or len(value) != length:
        raise ProtocolError(f"{what}: expected a list of {length}, got {type(value).__name__}")
    return value


def pair(value: Any) -> bool:
    return type(value) is tuple and len(value) == 2


def text(value: Any, limit: int) -> bool:
    return type(value) is str and len(value) <= limit


def seconds(value: Any, what: str) -> float:
    """``value`` as seconds: a finite, non-negative timing; ``ProtocolError`` otherwise."""
    if type(value) not in (int, float) or not 0 <= value <= MAX_SECONDS:  # NaN compares false
        raise ProtocolError(f"{what} is no timing: {brief(value)}")
    return float(value)


def brief(value: Any) -> str:
    """A value for an error message, never expensive (no repr of a huge int or list)."""
    if type(value) is int and value.bit_length() > 64:
        return "a huge int"
    if type(value) in (int, float, bool, type(None)) or text(value, 40):
        return repr(value)
    return f"a {type(value).__name__}"


def outcome(ok: bool, value: Any, reply: ReplyShape, kind: str) -> tuple[bool, Any]:
    """What the owner makes of a reply's value: ``(True, the checked result)`` or
    ``(False, the StreamerError it describes)``; ``ProtocolError`` for anything else."""
    if ok:
        return True, reply.check(value)
    return False, from_wire(value, kind)


# ------------------------------------------------------------------ frames


def pack(message: Any) -> bytes:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return HEADER.pack(len(data)) + data


class _ReplyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _REPLY_CLASSES:
            return super().find_class(module, name)
        raise ProtocolError(f"a worker reply may not contain {module[:100]}.{name[:100]}")


def unpack_reply(data: bytes) -> tuple[Any, bool, Any]:
    """A reply frame's payload as ``(request_id, ok, value)``; ``ProtocolError`` otherwise."""
    try:
        message = _ReplyUnpickler(io.BytesIO(data)).load()
    except ProtocolError:
        raise
    except Exception as exc:
        raise ProtocolError(f"undecodable reply: {type(exc).__name__}: {str(exc)[:200]}") from exc
    if not (type(message) is tuple and len(message) == 3 and type(message[1]) is bool):
        raise ProtocolError(f"malformed reply of type {type(message).__name__}")
    request_id = message[0]
    if not (type(request_id) is int or (type(request_id) is str and request_id == READY)):
        raise ProtocolError(f"a reply with a request id of type {type(request_id).__name__}")
    return message


async def read_reply(reader: asyncio.StreamReader) -> tuple[Any, bool, Any]:
    """The next reply from a worker (owner side); ``IncompleteReadError`` at EOF."""
    (size,) = HEADER.unpack(await reader.readexactly(HEADER.size))
    if size > MAX_FRAME_BYTES:
        raise ProtocolError(f"reply frame of {size} bytes")
    return unpack_reply(await reader.readexactly(size))


def read_request(fd: int) -> Any:
    """The next request (worker side, blocking); ``EOFError`` when the owner is gone."""
    (size,) = HEADER.unpack(_read_exactly(fd, HEADER.size))
    return pickle.loads(_read_exactly(fd, size))  # from our own owner: trusted


def write_frame(fd: int, frame: bytes) -> None:
    """Send one packed frame (worker side, blocking)."""
    view = memoryview(frame)
    while view:
        view = view[os.write(fd, view) :]


def _read_exactly(fd: int, size: int) -> bytes:
    chunks: list[bytes] = []
    while size:
        chunk = os.read(fd, size)
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)
