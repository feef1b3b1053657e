"""The worker side of a worker process: its entry point and its serve loop.

Every worker kind runs ``child_main`` (priority, logging), then its own ``main``
(load the model, attach shared memory), which hands a ``handle`` function to
``serve``. ``serve`` first confines the process (``workers.sandbox``: no network,
no file outside the Python installation and /dev) unless its owner turned that off
(``WorkerMain.sandbox``), so that everything a worker loads is loaded and no
request is ever read unconfined; then it answers requests one at a time until the
owner says stop or goes away. It never lets an exception end the process: every
error is mapped by ``codec.to_wire`` and sent back as that request's reply.

A worker whose requests keep failing with errors that are not about the input
(``max_consecutive_failures`` in a row, e.g. a CUDA error that sticks to the
context) exits after replying, with ``EXIT_RECYCLE``; its owner then starts a
fresh one. A ``RecordError`` (bad input) is the input's fault and does not count.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from streamer.errors import RecordError
from streamer.workers import codec, sandbox

log = logging.getLogger(__name__)

WORKER_NICENESS = 5
EXIT_RECYCLE = 75  # EX_TEMPFAIL: "try again", with a fresh process
MAX_CONSECUTIVE_FAILURES = 3


@dataclass(frozen=True)
class WorkerMain:
    """A worker kind's ``main`` and whether ``serve`` confines its process; what a pool
    hands to ``spawn`` (picklable: module-level function, plain flag)."""

    main: Callable[..., None]
    sandbox: bool = True

    def __call__(self, *args: Any) -> None:
        self.main(*args)


# Whether ``serve`` confines this process: set once by ``child_main``, so only a
# spawned worker is ever confined, never a process that calls ``serve`` itself.
_confine_at_serve = False


def child_main(target: Callable[..., None], log_level: int, *args: Any) -> None:
    """Entry point of every worker: lower priority, the owner's log level, then its main.

    Workers run at a lower CPU priority than the main process, so the event loop
    (Kafka I/O, acks, commits, metrics) is scheduled promptly even when decode and
    inference keep every core busy. A bare ``target`` is confined at ``serve``.
    """
    from streamer import logs

    global _confine_at_serve
    if isinstance(target, WorkerMain):
        _confine_at_serve, target = target.sandbox, target.main
    else:
        _confine_at_serve = True
    os.nice(WORKER_NICENESS)
    logs.configure(log_level)
    target(*args)


def serve(
    requests: Connection,
    replies: Connection,
    handle: Callable[[Any], Any],
    ready_info: Any = None,
    max_consecutive_failures: int = MAX_CONSECUTIVE_FAILURES,
) -> None:
    """Worker main loop: one reply per request, ``(id, True, result)`` or ``(id, False, error)``.

    A request body of ``None``, or the owner closing the pipe, ends the loop.
    """
    if _confine_at_serve:
        sandbox.confine()  # before READY: a started worker is a confined one
    reply_fd = replies.fileno()
    codec.write_frame(reply_fd, codec.pack((codec.READY, True, ready_info)))
    failures = 0
    while True:
        try:
            message = codec.read_request(requests.fileno())
        except EOFError:  # the owner is gone: exit quietly
            return
        if message is None:
            return
        request_id, body = message
        if body == codec.PING:
            codec.write_frame(reply_fd, codec.pack((request_id, True, codec.PING)))
            continue
        try:
            reply = codec.pack((request_id, True, handle(body)))
            failures = 0
        except Exception as exc:  # anything at all: mapped, never fatal to the process
            wire = codec.to_wire(exc)
            reply = codec.pack((request_id, False, wire))
            if isinstance(exc, RecordError):
                failures = 0  # the input's fault (a dead letter), not the worker's
            else:
                failures += 1
                log.warning("request failed pid=%s error=%s", os.getpid(), wire.message[:500])
        codec.write_frame(reply_fd, reply)
        if failures >= max_consecutive_failures:
            log.error(
                "recycling this worker after %d failed requests in a row pid=%s",
                failures,
                os.getpid(),
            )
            os._exit(EXIT_RECYCLE)  # replies are written; skip atexit (CUDA teardown may hang)
