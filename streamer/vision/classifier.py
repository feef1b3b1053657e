"""ResNet18 and the normalisation torchvision's transform applies, on one device.

``Classifier.classify`` takes a uint8 N x 3 x 224 x 224 batch on the CPU (pinned
memory and a non-blocking copy on CUDA, so only uint8 crosses PCIe), converts and
normalises on the device, runs the model under ``inference_mode`` in channels_last
layout, and returns top-k indices and scores per row. fp32 is the default;
bf16/fp16 are opt-in. No processes here: the inference worker wraps it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import NamedTuple

import torch

from streamer.vision.models import IMAGENET_MEAN, IMAGENET_STD, WeightsSpec, build_model

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class InferenceConfig:
    weights: WeightsSpec
    device: str = "cpu"  # "cpu" or "cuda:N"
    precision: str = "fp32"
    top_k: int = 5
    threads: int | None = None  # CPU intra-op threads
    warmup_batch: int = 8
    # Batch sizes whose forward pass is timed after the warm-up (``time_batches``).
    timed_batch_sizes: tuple[int, ...] = ()
    # What decodes JPEGs on the device (``vision.device_decode.LIBRARIES``).
    jpeg_library: str = "torchvision"


# Rounds of the batch-time table: each size keeps its fastest of this many passes.
TABLE_ROUNDS = 3


class BatchEntry(NamedTuple):
    slot: int
    encoded_bytes: int = 0  # > 0: the slot holds a JPEG to decode here, not pixels
    orientation: int = 1  # EXIF orientation of that JPEG


@dataclass(frozen=True)
class BatchResult:
    indices: list[list[int]]
    scores: list[list[float]]
    forward_s: float
    device: str = "cpu"
    # CUDA only: memory held by tensors, and utilisation when NVML is available.
    device_memory_bytes: int | None = None
    device_utilization: float | None = None
    # Entries (by position) whose JPEG the device could not decode: their scores are
    # void, and a decode worker decodes them on the CPU for a later batch.
    cpu_decode: tuple[int, ...] = ()
    # The worker's whole time on the batch (gathering rows, device decode, forward
    # pass): what the batch costs the device, for choosing batch sizes. 0: not measured.
    handled_s: float = 0.0


class Classifier:
    """ResNet18 plus the normalisation that torchvision's transform would apply."""

    def __init__(self, config: InferenceConfig) -> None:
        self.config = config
        self.device = torch.device(config.device)
        self.dtype = DTYPES[config.precision]
        model, self.weights_identity = build_model(config.weights)
        self.null = config.weights.kind == "null"  # no arithmetic on the pixels either
        self.model = model.to(self.device).to(memory_format=torch.channels_last)
        if self.dtype is not torch.float32:
            self.model = self.model.to(self.dtype)
        shape = (1, 3, 1, 1)
        self.mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(shape)
        self.std = torch.tensor(IMAGENET_STD, device=self.device).view(shape)

    @torch.inference_mode()
    def classify(
        self, pixels: torch.Tensor | None, device_rows: dict[int, torch.Tensor] | None = None
    ) -> BatchResult:
        """``pixels``: uint8 N x 3 x 224 x 224 on the CPU; ``device_rows`` replace rows
        with pixels already on the device (decoded there). ``pixels`` None: the device
        rows are all N rows, and nothing is copied from the host."""
        started = time.perf_counter()
        if pixels is None:
            assert device_rows is not None
            pixels = torch.stack([device_rows[i] for i in range(len(device_rows))])
            device_rows = None
        elif self.device.type == "cuda":
            pixels = pixels.pin_memory().to(self.device, non_blocking=True)
        if device_rows:
            rows = list(device_rows)
            pixels[rows] = torch.stack([device_rows[i] for i in rows])
        if self.null:
            logits = self.model(pixels)
        else:
            # Same arithmetic as ToTensor/ConvertImageDtype + Normalize, in that order.
            x = pixels.float().div_(255).sub_(self.mean).div_(self.std)
            x = x.to(self.dtype).contiguous(memory_format=torch.channels_last)
            logits = self.model(x).float()
        scores, indices = torch.softmax(logits, dim=1).topk(self.config.top_k, dim=1)
        indices_list, scores_list = indices.cpu().tolist(), scores.cpu().tolist()
        forward_s = time.perf_counter() - started
        if self.device.type != "cuda":
            return BatchResult(indices_list, scores_list, forward_s)
        return BatchResult(
            indices_list,
            scores_list,
            forward_s,
            str(self.device),
            torch.cuda.memory_allocated(self.device),
            _utilization(self.device),
        )

    def warm_up(self) -> None:
        self.classify(torch.zeros((self.config.warmup_batch, 3, 224, 224), dtype=torch.uint8))

    def time_batches(self, sizes: tuple[int, ...], rounds: int = TABLE_ROUNDS) -> dict[int, float]:
        """Seconds of one forward pass per batch size: the batch-time table t(b).

        The largest batch runs once untimed first (allocations, kernel selection).
        Then every size runs once per round, ``rounds`` times, and keeps its fastest
        pass: a pass slowed by something else on the machine (a worker loading
        beside this one) does not decide the batch size.
        """
        if not sizes:
            return {}
        inputs = {
            size: torch.zeros((size, 3, 224, 224), dtype=torch.uint8) for size in sorted(sizes)
        }
        self.classify(inputs[max(inputs)])
        table: dict[int, float] = {}
        for _ in range(rounds):
            for size, pixels in inputs.items():
                seconds = self.classify(pixels).forward_s
                table[size] = min(seconds, table.get(size, seconds))
        return table


def _utilization(device: torch.device) -> float | None:
    try:
        return torch.cuda.utilization(device) / 100.0  # needs NVML (pynvml)
    except Exception:
        return None
