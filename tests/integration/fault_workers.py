"""An inference worker with a fault injected, for tests/integration/test_worker_faults.py.

The tests point the engine at ``inference_main`` instead of the real
``streamer.workers.inference_worker.main``; spawned, it installs the fault named by
``STREAMER_TEST_FAULT`` in its own process, then runs the real main. Nothing in
the product knows about faults. Images that trigger a fault are solid-colour
PNGs: every pixel of their 224x224 crop has the same value (``TRIGGER``).

- ``die-at-start``: the first ``DIE_AT_START`` inference processes exit before
  they load the model (a CUDA out-of-memory at load, say), counted across
  processes in ``$STREAMER_TEST_FAULT_DIR/starts``; ``die-always``: every one.
- ``hang``: a batch holding a trigger image never returns (a stuck driver call).
- ``unknown``: a batch holding a trigger image raises ``KeyError`` outside the
  classifier (in the batch handler), an error nobody wrapped.
- ``sticky``: the first trigger image puts the process in a state where every
  batch fails (a CUDA error that sticks to the context) until it is replaced;
  once only, across processes (``$STREAMER_TEST_FAULT_DIR/stuck``).
"""

from __future__ import annotations

import fcntl
import os
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

TRIGGER = 7  # the grey level of a trigger image
DIE_AT_START = 5


def trigger_png() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (300, 260), (TRIGGER,) * 3).save(buffer, "PNG")
    return buffer.getvalue()


def _has_trigger(pixels: Any) -> bool:
    """Whether any row of a uint8 N x 3 x 224 x 224 batch is the trigger image."""
    return bool((pixels == TRIGGER).flatten(1).all(1).any())


def _bump(path: Path) -> int:
    """Increment a counter file shared by every process of the test; the new value."""
    with open(path, "a+") as file:
        fcntl.flock(file, fcntl.LOCK_EX)
        file.seek(0)
        count = int(file.read() or 0) + 1
        file.seek(0)
        file.truncate()
        file.write(str(count))
        return count


def inference_main(requests: Connection, replies: Connection, *args: Any) -> None:
    from streamer.vision import classifier
    from streamer.workers import inference_worker

    fault = os.environ["STREAMER_TEST_FAULT"]
    state = Path(os.environ["STREAMER_TEST_FAULT_DIR"])
    real_classify = classifier.Classifier.classify
    if fault == "die-always" or (
        fault == "die-at-start" and _bump(state / "starts") <= DIE_AT_START
    ):
        os._exit(3)
    if fault == "hang":

        def classify(self: Any, pixels: Any, device_rows: Any = None) -> Any:
            if _has_trigger(pixels):
                time.sleep(3600)
            return real_classify(self, pixels, device_rows)

        classifier.Classifier.classify = classify  # type: ignore[method-assign]
    if fault == "unknown":
        real_handler = inference_worker.batch_handler

        def batch_handler(cls: Any, decoder: Any, pixels: Any, payload: Any) -> Any:
            handle = real_handler(cls, decoder, pixels, payload)

            def failing(entries: list[Any]) -> Any:
                if any(
                    int(pixels[e.slot].min()) == int(pixels[e.slot].max()) == TRIGGER
                    for e in entries
                ):
                    return {}["no such key"]
                return handle(entries)

            return failing

        inference_worker.batch_handler = batch_handler  # type: ignore[assignment]
    if fault == "sticky":
        stuck = False

        def classify(self: Any, pixels: Any, device_rows: Any = None) -> Any:
            nonlocal stuck
            if not stuck and _has_trigger(pixels) and _bump(state / "stuck") == 1:
                stuck = True
            if stuck:
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            return real_classify(self, pixels, device_rows)

        classifier.Classifier.classify = classify  # type: ignore[method-assign]
    inference_worker.main(requests, replies, *args)
