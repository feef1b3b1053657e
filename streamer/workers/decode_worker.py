"""Decode worker process: payload slot in, 3x224x224 uint8 pixel slot out."""

from __future__ import annotations

import os
import signal
import time
from multiprocessing.connection import Connection

from streamer.errors import DecodeError
from streamer.workers.decode import DecodeLimits, decode_into
from streamer.workers.process import serve
from streamer.workers.shm import SlotLayout, SlotView


def main(
    requests: Connection, replies: Connection, layout: SlotLayout, limits: DecodeLimits
) -> None:
    # SIGINT goes to the whole process group on Ctrl-C; the owner decides when we stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    view = SlotView.attach(layout)

    def handle(body: tuple[int, int]) -> float:
        slot, length = body
        started = time.perf_counter()
        try:
            decode_into(view.payload(slot, length), view.pixels[slot], limits)
        except DecodeError:
            raise
        except Exception as exc:  # Pillow has many ways to fail on hostile input
            raise DecodeError(f"{type(exc).__name__}: {exc}", reason="decode-failed") from exc
        return time.perf_counter() - started

    try:
        serve(requests, replies, handle, ready_info=os.getpid())
    finally:
        view.close()
