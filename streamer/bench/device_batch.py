"""Where one batch's time goes in the inference worker when JPEGs are decoded on the device.

For a batch of the service's largest size (corpus JPEGs cycled), each step the worker
takes, timed on its own (median of ``reps`` after two warm-ups; each step ends with
the device synchronised):

- ``decode_s`` per library: the batched decode alone (``JpegBatchDecoder``'s library);
- ``resize_each_s``: orientation, resize and crop one image at a time (the old path);
- ``resize_grouped_s``: the same with one resize per group of equal size (the path now);
- ``host_rows_s``: gathering the batch's CPU pixel rows and copying them to the device,
  which the worker now skips when every row was decoded on the device;
- ``forward_s``: the classifier on pixels already on the device.

The engine figure is the sum of what the worker does per batch, overlapped with
nothing (one worker, one stream), so these say which step to cut next.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from streamer.bench.device_check import encoded
from streamer.vision.classifier import Classifier, InferenceConfig
from streamer.vision.device_decode import (
    JpegBatchDecoder,
    orient,
    resize_and_crop,
    resize_and_crop_all,
)
from streamer.vision.models import WeightsSpec

DEVICE_BATCH_STAGE = "device_batch"
NVIMGCODEC_BACKENDS = ("hw_gpu_only", "gpu_only", "hybrid_cpu_gpu")


def _median_s(step: Callable[[], object], device: torch.device, reps: int) -> float:
    def timed() -> float:
        started = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - started

    timed()
    timed()
    return statistics.median(timed() for _ in range(reps))


def breakdown(
    corpus: list[bytes],
    device: str,
    libraries: list[str],
    batch: int,
    weights: str,
    precision: str,
    reps: int = 10,
) -> dict[str, Any]:
    images = [encoded(corpus[i % len(corpus)]) for i in range(batch)]
    where = torch.device(device)
    out: dict[str, Any] = {"batch": batch, "reps": reps, "by_library": {}}
    oriented: list[torch.Tensor] = []  # the last library's images, as the worker orients them
    for library in libraries:
        decoder = JpegBatchDecoder(where, library)
        full = decoder.decode_full_size(images)
        oriented = [
            orient(d, image.orientation)
            for d, image in zip(full, images, strict=True)
            if isinstance(d, torch.Tensor)
        ]
        out["by_library"][library] = {
            "decode_s": _median_s(lambda: decoder.decode_full_size(images), where, reps),  # noqa: B023
            "decoded": len(oriented),
        }
    if "nvimgcodec" in libraries:
        # Its backends one at a time: which one its own choice takes, and which is fastest.
        for backend in NVIMGCODEC_BACKENDS:
            try:
                decoder = JpegBatchDecoder(where, "nvimgcodec", backend)
                n = sum(isinstance(d, torch.Tensor) for d in decoder.decode_full_size(images))
                seconds = _median_s(lambda: decoder.decode_full_size(images), where, reps)  # noqa: B023
                out["by_library"][f"nvimgcodec:{backend}"] = {"decode_s": seconds, "decoded": n}
            except Exception as exc:  # a backend this GPU or build lacks
                out["by_library"][f"nvimgcodec:{backend}"] = {
                    "error": f"{type(exc).__name__}: {exc}"
                }
    out["resize_each_s"] = _median_s(lambda: [resize_and_crop(d) for d in oriented], where, reps)
    out["resize_grouped_s"] = _median_s(lambda: resize_and_crop_all(oriented), where, reps)
    rows = torch.stack(resize_and_crop_all(oriented))
    host = torch.zeros((4 * batch, *rows.shape[1:]), dtype=torch.uint8)  # a pixel segment
    slots = torch.arange(batch, dtype=torch.long) * 3 % (4 * batch)

    def host_rows() -> torch.Tensor:
        gathered = host.index_select(0, slots)
        if where.type == "cuda":
            return gathered.pin_memory().to(where, non_blocking=True)
        return gathered

    out["host_rows_s"] = _median_s(host_rows, where, reps)
    classifier = Classifier(InferenceConfig(WeightsSpec.parse(weights), device, precision))
    classifier.warm_up()
    on_device = dict(enumerate(rows))
    out["forward_s"] = _median_s(lambda: classifier.classify(None, on_device), where, reps)
    return out
