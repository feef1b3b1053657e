"""Worker targets that fail on purpose, for the supervision tests.

A target runs in a spawned process (it must be importable at module level) and
ends in ``child.serve`` like a real worker. Every start appends the process id
to a file, so a test can count starts and check that every process is gone;
the start's number (1-based, over all processes sharing the file) decides
whether it dies before it reports ready, just after, or serves.

Request bodies: ``("echo", x)`` answers ``x``; ``("sleep", s)`` sleeps ``s``
seconds first (a hang, seen from the owner); ``("fail", _)`` raises a plain
error (after ``child.MAX_CONSECUTIVE_FAILURES`` in a row the worker recycles).
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Container
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from streamer.workers import codec
from streamer.workers.child import serve


def record_start(starts_path: str) -> int:
    """Append this process's id to the file; the number of this start (1-based)."""
    with open(starts_path, "a+") as file:
        fcntl.flock(file, fcntl.LOCK_EX)  # released when the file closes
        file.write(f"{os.getpid()}\n")
        file.flush()
        file.seek(0)
        return len(file.read().split())


def started_pids(starts_path: str | Path) -> list[int]:
    path = Path(starts_path)
    return [int(pid) for pid in path.read_text().split()] if path.exists() else []


def handle(body: tuple[str, Any]) -> Any:
    operation, value = body
    if operation == "sleep":
        time.sleep(value)
    elif operation == "fail":
        raise RuntimeError("the device is in a bad state")
    return value


def flaky(
    requests: Connection,
    replies: Connection,
    starts_path: str,
    die_before_ready: Container[int] = (),
    die_after_ready: Container[int] = (),
) -> None:
    """Dies with exit code 1 at the starts numbered in ``die_before_ready`` (like a
    CUDA OOM while loading the model), or right after it reported ready at those in
    ``die_after_ready``; serves ``handle`` otherwise."""
    start = record_start(starts_path)
    if start in die_before_ready:
        os._exit(1)
    if start in die_after_ready:
        codec.write_frame(replies.fileno(), codec.pack((codec.READY, True, os.getpid())))
        os._exit(1)
    serve(requests, replies, handle, ready_info=os.getpid())
