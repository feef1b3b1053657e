"""(a) The model ceiling: forward passes on ready uint8 tensors, per batch size.

Runs the inference worker's own ``Classifier`` (normalise, ResNet18 in
channels_last, softmax, top-k) in this process, with the same thread count and
precision the service's inference worker gets, on tensors already in memory: no
decode, no IPC, no Kafka. The best batch size's images per second is the
ceiling the pipeline is compared with.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from streamer.vision.classifier import Classifier, InferenceConfig
from streamer.vision.models import WeightsSpec

log = logging.getLogger(__name__)


def run_ceiling(
    weights: str,
    precision: str,
    threads: int,
    batch_sizes: tuple[int, ...],
    min_s: float,
    device: str = "cpu",
) -> dict[str, Any]:
    """Images per second and seconds per forward pass for each batch size."""
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        classifier = Classifier(InferenceConfig(WeightsSpec.parse(weights), device, precision))
        generator = torch.Generator().manual_seed(0)
        by_batch: dict[str, dict[str, float]] = {}
        for size in batch_sizes:
            pixels = torch.randint(
                0, 256, (size, 3, 224, 224), dtype=torch.uint8, generator=generator
            )
            classifier.classify(pixels)  # warm-up: allocator and kernel selection
            passes: list[float] = []
            started = time.perf_counter()
            while len(passes) < 2 or time.perf_counter() - started < min_s:
                passes.append(classifier.classify(pixels).forward_s)
            mean_s = sum(passes) / len(passes)
            by_batch[str(size)] = {
                "images_per_s": size / mean_s,
                "forward_s": mean_s,
                "passes": float(len(passes)),
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


def best_of(sweeps: list[dict[str, Any]]) -> dict[str, Any]:
    """Per batch size, the fastest of several sweeps (the machine is shared: take its best).

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
        sweeps=sweeps,
    )
    return merged
