"""The one wire format between the service and its worker processes.

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
An exception whose constructor takes other arguments could not be unpickled,
and one that is not a ``StreamerError`` would stop the service.

The main process holds the credentials and workers parse hostile bytes, so the
owner's unpickler only builds the classes in ``_REPLY_CLASSES``; a worker that
sends anything else is treated as broken (killed and replaced), not obeyed.
"""

from __future__ import annotations

import asyncio
import io
import os
import pickle
import struct
from typing import Any, NamedTuple

from streamer import errors
from streamer.errors import RecordError, StreamerError, WorkerError

HEADER = struct.Struct("!I")
MAX_FRAME_BYTES = 64 * 1024 * 1024  # replies are top-k lists; a bigger frame is a broken worker
READY = "ready"  # the request id of a worker's first reply
PING = "ping"  # a request body the worker loop answers itself: it is alive

# Classes (besides builtins) a reply may contain, by (module, name).
_REPLY_CLASSES = {
    ("streamer.vision.classifier", "BatchResult"),
    ("streamer.workers.codec", "WireError"),
}


class ProtocolError(StreamerError):
    """A worker sent a frame this codec does not accept."""

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
        return WireError(type(exc).__name__, str(exc), exc.retriable, exc.reason, exc.stage)
    if isinstance(exc, StreamerError):
        return WireError(type(exc).__name__, str(exc), exc.retriable)
    # Unknown: a bug, or the device in a bad state. Retrying elsewhere may succeed.
    return WireError("WorkerError", f"{type(exc).__name__}: {exc}", True)


def from_wire(wire: WireError, kind: str) -> StreamerError:
    """The exception the owner raises for a worker's error reply."""
    cls = getattr(errors, wire.type_name, None)
    if isinstance(cls, type) and issubclass(cls, RecordError):
        try:
            return cls(wire.message, reason=wire.reason, stage=wire.stage)
        except TypeError:  # its own constructor: the base class keeps reason and stage
            return RecordError(wire.message, reason=wire.reason, stage=wire.stage)
    if cls is WorkerError or not (isinstance(cls, type) and issubclass(cls, StreamerError)):
        return WorkerError(kind, wire.message)
    try:
        return cls(wire.message)
    except TypeError:  # a class with other constructor arguments: keep its meaning
        return WorkerError(kind, f"{wire.type_name}: {wire.message}", retriable=wire.retriable)


def pack(message: Any) -> bytes:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return HEADER.pack(len(data)) + data


class _ReplyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _REPLY_CLASSES:
            return super().find_class(module, name)
        raise ProtocolError(f"a worker reply may not contain {module}.{name}")


def unpack_reply(data: bytes) -> tuple[Any, bool, Any]:
    """A reply frame's payload as ``(request_id, ok, value)``; ``ProtocolError`` otherwise."""
    try:
        message = _ReplyUnpickler(io.BytesIO(data)).load()
    except ProtocolError:
        raise
    except Exception as exc:
        raise ProtocolError(f"undecodable reply: {type(exc).__name__}: {exc}") from exc
    if not (isinstance(message, tuple) and len(message) == 3 and isinstance(message[1], bool)):
        raise ProtocolError(f"malformed reply of type {type(message).__name__}")
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
