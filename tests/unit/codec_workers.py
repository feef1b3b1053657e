"""Worker targets for tests/unit/test_codec.py: spawned, so they live at module level.

Each one serves requests with a handler that fails in a particular way; the body
of a request picks the behaviour.
"""

from __future__ import annotations

from multiprocessing.connection import Connection
from typing import Any

from streamer.workers.child import serve


class NeedsTwoArguments(Exception):
    """An exception that pickle cannot rebuild: its constructor takes two arguments."""

    def __init__(self, what: str, code: int) -> None:
        super().__init__(f"{what} ({code})")


def _handle(body: Any) -> Any:
    if body == "ok":
        return "fine"
    if body == "unknown":
        return {}["a key error outside any wrapper"]
    if body == "unpicklable-error":
        raise NeedsTwoArguments("device lost", 7)
    if body == "unpicklable-result":
        return lambda: None
    if body == "always-fails":
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    raise ValueError(f"unexpected body {body!r}")


def main(requests: Connection, replies: Connection) -> None:
    serve(requests, replies, _handle, ready_info="ready")
