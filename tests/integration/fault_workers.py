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
  once only, across processes (``$STREAMER_TEST_FAULT_DIR/stuck``, opened before
  the worker is confined: once it serves, it can open no file there).
- ``snoop``: a hijacked worker. A batch holding a trigger image first tries to
  read the owner's ``/proc/<ppid>/environ``, the password file
  (``$STREAMER_TEST_FAULT_DIR/password``) and to connect to the first broker of
  ``STREAMER_BOOTSTRAP_SERVERS``; it logs one line, ``snoop environ=... password=...
  broker=...``, each ``allowed`` or the error's class (the log is the only way out
  once the worker is confined), then classifies the batch as usual.

``service_main`` is ``streamer run`` with these workers, for tests that run the
service as a process of its own (``-c``, so that workers import this module by name).
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import IO, Any

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
        return _bump_open(file)


def _bump_open(file: IO[str]) -> int:
    """``_bump`` on a counter file opened in "a+" mode (and left open)."""
    fcntl.flock(file, fcntl.LOCK_EX)
    try:
        file.seek(0)
        count = int(file.read() or 0) + 1
        file.seek(0)
        file.truncate()
        file.write(str(count))
        file.flush()
        return count
    finally:
        fcntl.flock(file, fcntl.LOCK_UN)


def _attempt(action: Any) -> str:
    """``allowed`` when ``action()`` succeeds, else the class of the error it raised."""
    try:
        action()
    except Exception as exc:
        return type(exc).__name__
    return "allowed"


def _snoop(state: Path) -> None:
    """What a hijacked worker would try first; one log line with the outcomes."""

    def environ() -> None:
        with open(f"/proc/{os.getppid()}/environ", "rb") as file:
            file.read()

    def password() -> None:
        (state / "password").read_bytes()

    def broker() -> None:
        host, port = os.environ["STREAMER_BOOTSTRAP_SERVERS"].split(",")[0].rsplit(":", 1)
        socket.create_connection((host, int(port)), timeout=10).close()

    outcomes = {
        name: _attempt(action)
        for name, action in (("environ", environ), ("password", password), ("broker", broker))
    }
    logging.getLogger(__name__).warning(
        "snoop %s", " ".join(f"{name}={outcome}" for name, outcome in outcomes.items())
    )


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
        # Opened now and kept: once the worker serves it is confined, and opens nothing here.
        counter = open(state / "stuck", "a+")  # noqa: SIM115

        def classify(self: Any, pixels: Any, device_rows: Any = None) -> Any:
            nonlocal stuck
            if not stuck and _has_trigger(pixels) and _bump_open(counter) == 1:
                stuck = True
            if stuck:
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            return real_classify(self, pixels, device_rows)

        classifier.Classifier.classify = classify  # type: ignore[method-assign]
    if fault == "snoop":

        def classify(self: Any, pixels: Any, device_rows: Any = None) -> Any:
            if _has_trigger(pixels):
                _snoop(state)
            return real_classify(self, pixels, device_rows)

        classifier.Classifier.classify = classify  # type: ignore[method-assign]
    inference_worker.main(requests, replies, *args)


def service_main() -> int:
    """``streamer run`` whose inference workers run ``inference_main``."""
    from streamer.cli import main
    from streamer.workers import inference_worker

    inference_worker.main = inference_main
    return main(["run"])
