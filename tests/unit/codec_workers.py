"""Worker targets for the process-boundary tests: spawned, so they live at module level.

``main`` serves requests with a handler that fails in a particular way; the body of
a request picks the behaviour. The scripted targets (below) send chosen replies.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
import types
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any, NamedTuple

from streamer.workers import codec
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


# ---------------------------------------------------------------- scripted replies
#
# ``scripted_decode`` and ``scripted_inference`` answer like honest decode and
# inference workers (without shared memory or a model), except for a request that
# holds slot ``POISON``: its reply frame is what ``corrupt(request_id, body, honest
# value)`` returns. The corruptions below are what a compromised worker could send.

POISON = 13
TOP_K = 5  # Settings().top_k
SCORES = [0.5, 0.2, 0.1, 0.1, 0.05]

Corrupt = Callable[[int, list[Any], Any], tuple[Any, bool, Any]]


def scripted_decode(requests: Connection, replies: Connection, corrupt: Corrupt) -> None:
    _serve_scripted(requests, replies, lambda body: [(True, (0.001, 0)) for _ in body], corrupt)


def scripted_inference(requests: Connection, replies: Connection, corrupt: Corrupt) -> None:
    classifier = _light_classifier()

    def honest(body: list[Any]) -> Any:
        rows = len(body)
        return classifier.BatchResult([list(range(TOP_K))] * rows, [SCORES] * rows, 0.001)

    _serve_scripted(requests, replies, honest, corrupt)


def _light_classifier() -> Any:
    """Stand-ins for ``BatchEntry`` and ``BatchResult`` under the classifier's module
    name, with the same fields: the worker reads requests and writes replies without
    importing torch (seconds per start on a busy machine); the owner unpickles the
    real classes. Only ever called in a spawned worker."""
    module = types.ModuleType("streamer.vision.classifier")

    class BatchEntry(NamedTuple):
        slot: int
        encoded_bytes: int = 0
        orientation: int = 1

    @dataclasses.dataclass(frozen=True)
    class BatchResult:
        indices: list[list[int]]
        scores: list[list[float]]
        forward_s: float
        device: str = "cpu"
        device_memory_bytes: int | None = None
        device_utilization: float | None = None
        cpu_decode: tuple[int, ...] = ()
        handled_s: float = 0.0

    for cls in (BatchEntry, BatchResult):
        cls.__module__, cls.__qualname__ = module.__name__, cls.__name__
        setattr(module, cls.__name__, cls)
    sys.modules[module.__name__] = module
    return module


def _serve_scripted(
    requests: Connection, replies: Connection, honest: Callable[[list[Any]], Any], corrupt: Corrupt
) -> None:
    fd = replies.fileno()
    codec.write_frame(fd, codec.pack((codec.READY, True, os.getpid())))
    compromised = False
    while True:
        try:
            message = codec.read_request(requests.fileno())
        except EOFError:
            # An honest worker exits when its owner closes the pipe; a compromised
            # one need not: only a kill ends it.
            while compromised:
                time.sleep(3600)
            return
        if message is None:
            return
        request_id, body = message
        if body == codec.PING:
            frame: tuple[Any, bool, Any] = (request_id, True, codec.PING)
        elif any(item[0] == POISON for item in body):
            frame, compromised = corrupt(request_id, body, honest(body)), True
        else:
            frame = (request_id, True, honest(body))
        codec.write_frame(fd, codec.pack(frame))


def untouched(request_id: int, body: list[Any], value: Any) -> tuple[Any, bool, Any]:
    """The honest reply: for a worker that should not misbehave."""
    return request_id, True, value


def _poison_answer(body: list[Any], answers: list[Any], answer: Any) -> list[Any]:
    return [answer if item[0] == POISON else a for item, a in zip(body, answers, strict=True)]


def short_scores(request_id: int, body: list[Any], result: Any) -> tuple[Any, bool, Any]:
    return request_id, True, dataclasses.replace(result, scores=result.scores[:-1])


def cpu_decode_past_the_batch(
    request_id: int, body: list[Any], result: Any
) -> tuple[Any, bool, Any]:
    return request_id, True, dataclasses.replace(result, cpu_decode=(len(body),))


def cpu_decode_of_decoded_pixels(
    request_id: int, body: list[Any], result: Any
) -> tuple[Any, bool, Any]:
    """Sends an entry that holds pixels back to the CPU decode (a worker that always did
    would keep the record going round between the decode and inference stages)."""
    return request_id, True, dataclasses.replace(result, cpu_decode=(0,))


def device_of_its_own(request_id: int, body: list[Any], result: Any) -> tuple[Any, bool, Any]:
    """A new metric label value with every batch."""
    device = f"cuda:{request_id + 100}"
    return request_id, True, dataclasses.replace(result, device=device, device_memory_bytes=1)


def nan_score(request_id: int, body: list[Any], result: Any) -> tuple[Any, bool, Any]:
    scores = [[math.nan] * TOP_K for _ in body]
    return request_id, True, dataclasses.replace(result, scores=scores)


def error_class_not_a_string(
    request_id: int, body: list[Any], answers: Any
) -> tuple[Any, bool, Any]:
    bad = (False, codec.WireError(1, "bad", True))  # type: ignore[arg-type]
    return request_id, True, _poison_answer(body, answers, bad)


def reason_not_a_string(request_id: int, body: list[Any], answers: Any) -> tuple[Any, bool, Any]:
    bad = (False, codec.WireError("DecodeError", "bad", False, 5, "decode"))  # type: ignore[arg-type]
    return request_id, True, _poison_answer(body, answers, bad)


def reason_of_its_own(request_id: int, body: list[Any], answers: Any) -> tuple[Any, bool, Any]:
    """A well-formed error with a new dead-letter reason (a metric label) every time."""
    bad = (False, codec.WireError("DecodeError", "bad", False, f"reason-{request_id}", "decode"))
    return request_id, True, _poison_answer(body, answers, bad)


def error_not_a_wire_error(request_id: int, body: list[Any], answers: Any) -> tuple[Any, bool, Any]:
    return request_id, False, "not a WireError"


def request_id_unhashable(request_id: int, body: list[Any], answers: Any) -> tuple[Any, bool, Any]:
    return [request_id], True, answers


def request_id_of_no_request(
    request_id: int, body: list[Any], answers: Any
) -> tuple[Any, bool, Any]:
    return request_id + 1000, True, answers
