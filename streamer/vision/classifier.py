"""ResNet18 and the normalisation torchvision's transform applies, on one device.

``Classifier.classify`` takes a uint8 N x 3 x 224 x 224 batch on the CPU (pinned
memory and a non-blocking copy on CUDA, so only uint8 crosses PCIe), converts and
normalises on the device, runs the model under ``inference_mode`` in channels_last
layout, and returns top-k indices and scores per row. fp32 is the default;
bf16/fp16 are opt-in. No processes here: the inference worker wraps it.

``BatchReply`` is the shape the reply to an inference batch must have; the owner's
side of the pipe checks every ``BatchResult`` against it (``codec.Request``).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from streamer.vision.models import IMAGENET_MEAN, IMAGENET_STD, WeightsSpec, build_model
from streamer.workers import codec
from streamer.workers.codec import ProtocolError

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


_RESULT_FIELDS = frozenset(f.name for f in dataclasses.fields(BatchResult))


@dataclass(frozen=True)
class BatchReply:
    """The reply an inference batch must get (``codec.Request``), checked by the owner
    before anything reads it: a ``BatchResult`` with, per entry, a row of ``top_k``
    distinct class indices below ``classes`` and their scores (probabilities); finite
    timings; a device among ``devices`` (it becomes a metric label); and ``cpu_decode``
    naming only entries sent encoded, each once, so a worker cannot send a record back
    to the CPU decode for ever."""

    entries: Sequence[BatchEntry]
    top_k: int
    classes: int
    devices: frozenset[str]

    def check(self, value: Any) -> BatchResult:
        if type(value) is not BatchResult or set(vars(value)) != _RESULT_FIELDS:
            raise ProtocolError(f"an inference reply of type {type(value).__name__}")
        rows = len(self.entries)
        for row in codec.sized(value.indices, rows, "top-k indices"):
            indices = codec.sized(row, self.top_k, "a row of top-k indices")
            if not all(type(i) is int and 0 <= i < self.classes for i in indices):
                raise ProtocolError(f"a class index outside 0..{self.classes - 1}")
            if len(set(indices)) != self.top_k:
                raise ProtocolError("a top-k row names a class twice")
        for row in codec.sized(value.scores, rows, "top-k scores"):
            scores = codec.sized(row, self.top_k, "a row of top-k scores")
            if not all(type(s) is float and 0.0 <= s <= 1.0 for s in scores):  # NaN fails too
                raise ProtocolError("a score that is no probability")
        codec.seconds(value.forward_s, "forward_s")
        codec.seconds(value.handled_s, "handled_s")
        if not codec.text(value.device, codec.MAX_NAME_CHARS) or value.device not in self.devices:
            raise ProtocolError(f"device {codec.brief(value.device)} is not one of this engine's")
        memory, utilization = value.device_memory_bytes, value.device_utilization
        if memory is not None and not (type(memory) is int and 0 <= memory < 2**63):
            raise ProtocolError(f"device_memory_bytes {codec.brief(memory)}")
        if utilization is not None and not (type(utilization) is float and 0 <= utilization <= 1):
            raise ProtocolError(f"device_utilization {codec.brief(utilization)}")
        positions = value.cpu_decode
        if type(positions) is not tuple:
            raise ProtocolError(f"cpu_decode of type {type(positions).__name__}")
        for p in positions:
            if not (type(p) is int and 0 <= p < rows and self.entries[p].encoded_bytes > 0):
                raise ProtocolError(f"cpu_decode names {codec.brief(p)}, no entry sent encoded")
        if len(set(positions)) != len(positions):
            raise ProtocolError("cpu_decode names an entry twice")
        return value


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
