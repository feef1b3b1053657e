"""Decode worker process: payload slots in, 3x224x224 uint8 pixel slots out.

A request is a chunk: a list of ``(slot, length, defer_jpeg)``
(``streamer.pipeline.decode_chunks``). The reply has one ``(True, (seconds,
orientation))`` or ``(False, WireError)`` per request, in order, so a bad image
fails only itself; anything else raised fails the chunk.

With ``defer_jpeg`` (JPEGs are decoded on the inference device), a JPEG the
device can take is only checked (limits, allow-list) and probed for its EXIF
orientation; its pixels are left for the inference worker. A JPEG the device then
fails to decode comes back here without ``defer_jpeg``: the CPU fallback runs in
a decode worker, never in the inference worker, so the device does not wait on it.

With ``null`` (the ``null_decode`` setting, for benchmarks) every request is
answered at once, with no image read and no pixels written.
"""

from __future__ import annotations

import os
import signal
import time
from multiprocessing.connection import Connection
from typing import Any

from streamer.errors import DecodeError, RecordError
from streamer.vision.decode import DecodeLimits, decode_opened, open_image, probe
from streamer.workers import codec
from streamer.workers.child import serve
from streamer.workers.shm import SlotLayout, SlotView


def main(
    requests: Connection,
    replies: Connection,
    layout: SlotLayout,
    limits: DecodeLimits,
    null: bool = False,
) -> None:
    # SIGINT goes to the whole process group on Ctrl-C; the owner decides when we stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    view = SlotView.attach(layout)

    def handle_chunk(body: list[tuple[int, int, bool]]) -> list[tuple[bool, Any]]:
        answers: list[tuple[bool, Any]] = []
        for request in body:
            try:
                answers.append((True, handle(request)))
            except RecordError as exc:  # this input's fault: its own answer
                answers.append((False, codec.to_wire(exc)))
        return answers

    def handle(body: tuple[int, int, bool]) -> tuple[float, int]:
        """(seconds, 0) once the pixels are in the slot; (seconds, EXIF orientation) if deferred.

        The body is ``(slot, length, defer_jpeg)``; the engine sends ``defer_jpeg=False``
        for the CPU fallback of a JPEG the inference device could not decode.
        """
        slot, length, defer_jpeg = body
        started = time.perf_counter()
        if null:
            return 0.0, 0
        try:
            image = open_image(view.payload(slot, length), limits)
            orientation = probe(image) if defer_jpeg else None
            if orientation is not None:
                image.close()
                return time.perf_counter() - started, orientation
            decode_opened(image, view.pixels[slot])
        except DecodeError:
            raise
        except Exception as exc:  # Pillow has many ways to fail on hostile input
            raise DecodeError(f"{type(exc).__name__}: {exc}", reason="decode-failed") from exc
        return time.perf_counter() - started, 0

    try:
        serve(requests, replies, handle_chunk, ready_info=os.getpid())
    finally:
        view.close()
