"""Starting one worker process: the spawn, its two pipes, no credentials.

Every worker runs ``child.child_main(target, log level, requests, replies, *args)``
in a fresh interpreter ("spawn": no forked copy of the event loop, the Kafka
clients or the credentials in memory), started inside
``environment_without_credentials``. Before the first worker starts, the owner
makes itself non-dumpable (``sandbox.protect_owner``), so that no worker (nor any
other process of its uid without CAP_SYS_PTRACE) reads the credentials from its
``/proc/<pid>/environ`` or memory. The owner keeps only its own ends of the pipes,
as unbuffered files for asyncio's pipe transports; the caller owns them.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
from collections.abc import Callable
from typing import Any, BinaryIO

from streamer.workers import sandbox
from streamer.workers.child import child_main
from streamer.workers.environment import environment_without_credentials

_SPAWN = mp.get_context("spawn")


def spawn(
    name: str, target: Callable[..., None], args: tuple[Any, ...]
) -> tuple[mp.process.BaseProcess, BinaryIO, BinaryIO]:
    """Start the worker; its process, the file its replies come from and the file
    requests go to."""
    sandbox.protect_owner()
    req_read, req_write = _SPAWN.Pipe(duplex=False)
    rep_read, rep_write = _SPAWN.Pipe(duplex=False)
    process = _SPAWN.Process(
        target=child_main,
        args=(target, logging.getLogger().getEffectiveLevel(), req_read, rep_write, *args),
        name=f"streamer-{name}",
        daemon=True,
    )
    try:
        with environment_without_credentials():
            process.start()
    finally:
        # The child has its own copies now (or never will); keep only our ends.
        req_read.close()
        rep_write.close()
    read_file = os.fdopen(os.dup(rep_read.fileno()), "rb", buffering=0)
    write_file = os.fdopen(os.dup(req_write.fileno()), "wb", buffering=0)
    rep_read.close()
    req_write.close()
    return process, read_file, write_file
