"""(a) The model ceiling: forward passes on ready uint8 tensors, per batch size.

Runs the inference worker's own ``Classifier`` (normalise, ResNet18 in
channels_last, softmax, top-k) with the same thread count and precision the
service's inference worker gets, on tensors already in memory: no decode, no
IPC, no Kafka. The best batch size's images per second is the ceiling the
pipeline is compared with.

One worker runs in this process. Several (``cpu_inference_workers``) run as that
many processes at once, each sweeping the same batch size over the same window
(``Together``), and their images per second add up: the ceiling of the layout the
service runs.
"""

from __future__ import annotations

import logging
import multiprocessing
import queue
import time
from collections.abc import Iterator
from typing import Any

import torch

from streamer.vision.classifier import Classifier, InferenceConfig
from streamer.vision.models import WeightsSpec

log = logging.getLogger(__name__)


MIN_PASSES = 2  # each worker's fewest timed passes per batch size
ANSWER_TIMEOUT_S = 600.0  # a worker stuck in a pass fails the sweep, never hangs it


class Alone:
    """The pace of a sweep with nobody beside it: each size is timed for ``min_s``."""

    def start(self, index: int) -> None:
        pass

    def counted(self, index: int, passes: int) -> None:
        pass

    def may_finish(self, index: int) -> bool:
        return True

    def others_done(self, index: int) -> bool:
        return False

    def done(self, index: int) -> None:
        pass


class Together(Alone):
    """The pace of sweeps in several processes, timed over the same window.

    All start each batch size at a barrier. A worker may finish once it has timed
    ``min_s`` and every worker has ``MIN_PASSES`` passes counted; it says so, and
    the others stop there, leaving out the pass they are in (it ran partly alone).
    So every counted pass ran while all the workers were passing, and none stops
    before it has the passes its mean needs.
    """

    def __init__(self, barrier: Any, ready: list[Any], finished: list[Any], workers: int) -> None:
        self._barrier = barrier
        self._ready = ready  # per batch size: workers with MIN_PASSES counted (a shared int)
        self._finished = finished  # per batch size: an Event, set by the first to finish
        self._workers = workers

    def start(self, index: int) -> None:
        self._barrier.wait()

    def counted(self, index: int, passes: int) -> None:
        if passes == MIN_PASSES:
            with self._ready[index].get_lock():
                self._ready[index].value += 1

    def may_finish(self, index: int) -> bool:
        return bool(self._ready[index].value >= self._workers)

    def others_done(self, index: int) -> bool:
        return bool(self._finished[index].is_set())

    def done(self, index: int) -> None:
        self._finished[index].set()


def run_ceiling(
    weights: str,
    precision: str,
    threads: int,
    batch_sizes: tuple[int, ...],
    min_s: float,
    device: str = "cpu",
    pace: Alone | None = None,
) -> dict[str, Any]:
    """Images per second and seconds per forward pass for each batch size, in this
    process. Each row's ``windows`` holds when its counted passes ran and
    ``ran_until`` when it stopped passing (``time.monotonic``, one clock for the
    processes of a machine), a list with one entry per worker."""
    pace = pace or Alone()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        classifier = Classifier(InferenceConfig(WeightsSpec.parse(weights), device, precision))
        generator = torch.Generator().manual_seed(0)
        by_batch: dict[str, dict[str, Any]] = {}
        for index, size in enumerate(batch_sizes):
            pixels = torch.randint(
                0, 256, (size, 3, 224, 224), dtype=torch.uint8, generator=generator
            )
            classifier.classify(pixels)  # warm-up: allocator and kernel selection
            pace.start(index)
            passes: list[float] = []
            started = counted_until = time.monotonic()
            while True:
                forward_s = classifier.classify(pixels).forward_s
                ended = time.monotonic()
                if pace.others_done(index):
                    break  # another worker finished during this pass: not counted
                passes.append(forward_s)
                counted_until = ended
                pace.counted(index, len(passes))
                if (
                    len(passes) >= MIN_PASSES
                    and ended - started >= min_s
                    and pace.may_finish(index)
                ):
                    pace.done(index)
                    break
            ran_until = time.monotonic()  # after done(): every pass counted elsewhere ended before
            mean_s = sum(passes) / len(passes)
            by_batch[str(size)] = {
                "images_per_s": size / mean_s,
                "forward_s": mean_s,
                "passes": float(len(passes)),
                "workers": 1,
                "threads": threads,
                "windows": [[started, counted_until]],
                "ran_until": [ran_until],
            }
            log.info("ceiling batch=%d images_per_s=%.2f", size, size / mean_s)
    finally:
        torch.set_num_threads(previous_threads)
    best = max(by_batch, key=lambda k: by_batch[k]["images_per_s"])
    return {
        "device": device,
        "threads": threads,
        "precision": precision,
        "by_batch_size": by_batch,
        "best_batch_size": int(best),
        "images_per_s": by_batch[best]["images_per_s"],
    }


def run_ceiling_workers(
    workers: int,
    weights: str,
    precision: str,
    threads: int,
    batch_sizes: tuple[int, ...],
    min_s: float,
    device: str = "cpu",
) -> dict[str, Any]:
    """The ceiling of ``workers`` inference workers of ``threads`` threads each, all
    running at once (one: in this process). Per batch size, images per second are
    the workers' sum; ``forward_s`` is their mean, one worker's time per pass."""
    if workers == 1:
        alone = run_ceiling(weights, precision, threads, batch_sizes, min_s, device)
        return {**alone, "workers": 1}
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(workers), context.Queue()
    ready = [context.Value("i", 0) for _ in batch_sizes]
    finished = [context.Event() for _ in batch_sizes]
    args = (weights, precision, threads, batch_sizes, min_s, device, barrier, ready, finished)
    processes = [
        context.Process(target=_sweep_beside_others, args=(*args, workers, results))
        for _ in range(workers)
    ]
    for process in processes:
        process.start()
    sweeps: list[dict[str, Any]] = []
    deadline = time.monotonic() + ANSWER_TIMEOUT_S
    try:
        while len(sweeps) < workers:
            try:
                sweep = results.get(timeout=1.0)
            except queue.Empty:
                died = [p.exitcode for p in processes if p.exitcode not in (None, 0)]
                if died:
                    raise RuntimeError(f"a ceiling worker died (exit code {died[0]})") from None
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"no ceiling worker answered for {ANSWER_TIMEOUT_S:.0f} s"
                    ) from None
                continue
            deadline = time.monotonic() + ANSWER_TIMEOUT_S
            if isinstance(sweep, str):
                raise RuntimeError(f"a ceiling worker failed: {sweep}")
            sweeps.append(sweep)
    finally:
        # On failure the others would wait at the barrier, or for a worker that
        # will never count its passes: stop them.
        barrier.abort()
        for process in processes:
            process.join(timeout=60 if len(sweeps) == workers else 1)
            if process.is_alive():
                process.terminate()
                process.join()
    by_batch = {
        size: {
            "images_per_s": sum(s["by_batch_size"][size]["images_per_s"] for s in sweeps),
            "forward_s": sum(s["by_batch_size"][size]["forward_s"] for s in sweeps) / workers,
            "passes": sum(s["by_batch_size"][size]["passes"] for s in sweeps),
            "workers": workers,
            "threads": threads,
            "windows": [w for s in sweeps for w in s["by_batch_size"][size]["windows"]],
            "ran_until": [t for s in sweeps for t in s["by_batch_size"][size]["ran_until"]],
        }
        for size in sweeps[0]["by_batch_size"]
    }
    best = max(by_batch, key=lambda k: by_batch[k]["images_per_s"])
    return {
        **sweeps[0],
        "workers": workers,
        "by_batch_size": by_batch,
        "best_batch_size": int(best),
        "images_per_s": by_batch[best]["images_per_s"],
    }


def _sweep_beside_others(
    weights: str,
    precision: str,
    threads: int,
    batch_sizes: tuple[int, ...],
    min_s: float,
    device: str,
    barrier: Any,
    ready: list[Any],
    finished: list[Any],
    workers: int,
    results: Any,
) -> None:
    """One worker of ``run_ceiling_workers``: its sweep, or its error as a string."""
    try:
        pace = Together(barrier, ready, finished, workers)
        sweep: dict[str, Any] | str = run_ceiling(
            weights, precision, threads, batch_sizes, min_s, device, pace
        )
    except Exception as exc:
        barrier.abort()  # the other workers stop waiting for this one
        sweep = repr(exc)
    results.put(sweep)


def swept_rows(sweep: dict[str, Any], size: str) -> Iterator[dict[str, Any]]:
    """Every row measured for batch ``size`` in a sweep, through the sweeps that
    ``best_of`` merged into it (the runner merges twice: layouts, then two rounds)."""
    merged = sweep.get("sweeps")
    if not merged:
        yield sweep["by_batch_size"][size]
        return
    for inner in merged:
        yield from swept_rows(inner, size)


def best_of(sweeps: list[dict[str, Any]]) -> dict[str, Any]:
    """Per batch size, the fastest of several sweeps (the machine is shared: take its best).

    The sweeps may be of different layouts (``run_ceiling_workers``): each batch
    size's row names its own, and ``workers`` and ``threads`` are the best row's.
    Using the best sweep makes the targets that divide by the ceiling, or compare
    with a forward pass, harder to meet, never easier.
    """
    merged = dict(sweeps[0])
    by_batch = {
        size: max((s["by_batch_size"][size] for s in sweeps), key=lambda r: r["images_per_s"])
        for size in sweeps[0]["by_batch_size"]
    }
    best = max(by_batch, key=lambda k: by_batch[k]["images_per_s"])
    merged.update(
        by_batch_size=by_batch,
        best_batch_size=int(best),
        images_per_s=by_batch[best]["images_per_s"],
        workers=by_batch[best].get("workers", 1),
        threads=by_batch[best].get("threads", merged.get("threads")),
        sweeps=sweeps,
    )
    return merged
