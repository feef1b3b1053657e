"""Inference worker process: a batch of pixel slots in, top-k per slot out.

One per device. It gathers the batch's uint8 slots into one tensor (pinned
memory and a non-blocking copy on CUDA, so only uint8 crosses PCIe), converts and
normalises on the device, runs ResNet18 under ``inference_mode`` in channels_last
layout, and returns ``(indices, scores, forward_seconds)``. fp32 is the default;
bf16/fp16 are opt-in.

Entries whose JPEG was left encoded (``jpeg_decode`` on the device) are decoded
here first, batched, on the device (``streamer.workers.device_decode``); one the
device cannot decode falls back to the CPU path, and one that fails there too is
returned as that entry's ``DecodeError``.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import NamedTuple

import torch

from streamer.errors import DecodeError, InferenceFailed
from streamer.workers.decode import DecodeLimits, decode_into
from streamer.workers.device_decode import EncodedJpeg, JpegBatchDecoder
from streamer.workers.models import IMAGENET_MEAN, IMAGENET_STD, WeightsSpec, build_model
from streamer.workers.process import serve
from streamer.workers.shm import SlotLayout, SlotView

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class InferenceConfig:
    weights: WeightsSpec
    device: str = "cpu"  # "cpu" or "cuda:N"
    precision: str = "fp32"
    top_k: int = 5
    threads: int | None = None  # CPU intra-op threads
    warmup_batch: int = 8
    limits: DecodeLimits = dataclasses.field(default_factory=DecodeLimits)  # CPU fallback


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
    # Entries (by position) whose JPEG could not be decoded: their scores are void.
    errors: tuple[tuple[int, DecodeError], ...] = ()


class Classifier:
    """ResNet18 plus the normalisation that torchvision's transform would apply."""

    def __init__(self, config: InferenceConfig) -> None:
        self.config = config
        self.device = torch.device(config.device)
        self.dtype = DTYPES[config.precision]
        model, self.weights_identity = build_model(config.weights)
        self.model = model.to(self.device, memory_format=torch.channels_last)
        if self.dtype is not torch.float32:
            self.model = self.model.to(self.dtype)
        shape = (1, 3, 1, 1)
        self.mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(shape)
        self.std = torch.tensor(IMAGENET_STD, device=self.device).view(shape)

    @torch.inference_mode()
    def classify(
        self, pixels: torch.Tensor, device_rows: dict[int, torch.Tensor] | None = None
    ) -> BatchResult:
        """``pixels``: uint8 N x 3 x 224 x 224 on the CPU; ``device_rows`` replace rows
        with pixels already on the device (decoded there)."""
        started = time.perf_counter()
        if self.device.type == "cuda":
            pixels = pixels.pin_memory().to(self.device, non_blocking=True)
        if device_rows:
            rows = list(device_rows)
            pixels[rows] = torch.stack([device_rows[i] for i in rows])
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


def _utilization(device: torch.device) -> float | None:
    try:
        return torch.cuda.utilization(device) / 100.0  # needs NVML (pynvml)
    except Exception:
        return None


def main(
    requests: Connection, replies: Connection, layout: SlotLayout, config: InferenceConfig
) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if config.threads:
        torch.set_num_threads(config.threads)
    classifier = Classifier(config)
    classifier.warm_up()
    view = SlotView.attach(layout)
    decoder = JpegBatchDecoder(classifier.device)
    try:
        serve(
            requests,
            replies,
            _batch_handler(classifier, decoder, view, config.limits),
            ready_info={
                "pid": os.getpid(),
                "weights": classifier.weights_identity,
                "device": str(classifier.device),
                "precision": config.precision,
                "threads": torch.get_num_threads(),
            },
        )
    finally:
        view.close()


def _batch_handler(
    classifier: Classifier, decoder: JpegBatchDecoder, view: SlotView, limits: DecodeLimits
) -> Callable[[list[BatchEntry]], BatchResult]:
    pixels = torch.from_numpy(view.pixels)  # shares the segment, no copy

    def handle(entries: list[BatchEntry]) -> BatchResult:
        slots = torch.tensor([e.slot for e in entries], dtype=torch.long)
        batch = pixels.index_select(0, slots)
        device_rows, errors = _decode_deferred(entries, batch)
        try:
            result = classifier.classify(batch, device_rows)
        except Exception as exc:  # e.g. CUDA out of memory: every record of the batch retries
            raise InferenceFailed(f"{type(exc).__name__}: {exc}") from exc
        return dataclasses.replace(result, errors=tuple(errors.items())) if errors else result

    def _decode_deferred(
        entries: list[BatchEntry], batch: torch.Tensor
    ) -> tuple[dict[int, torch.Tensor], dict[int, DecodeError]]:
        deferred = [(i, e) for i, e in enumerate(entries) if e.encoded_bytes]
        if not deferred:
            return {}, {}
        encoded = [
            EncodedJpeg(
                torch.frombuffer(view.payload(e.slot, e.encoded_bytes), dtype=torch.uint8),
                e.orientation,
            )
            for _, e in deferred
        ]
        device_rows: dict[int, torch.Tensor] = {}
        errors: dict[int, DecodeError] = {}
        for (i, entry), decoded in zip(deferred, decoder.decode(encoded), strict=True):
            if not isinstance(decoded, DecodeError):
                device_rows[i] = decoded
                continue
            try:  # the exact CPU path, straight into the batch row
                decode_into(view.payload(entry.slot, entry.encoded_bytes), batch[i].numpy(), limits)
            except DecodeError as exc:
                errors[i] = exc
            except Exception as exc:
                errors[i] = DecodeError(f"{type(exc).__name__}: {exc}", reason="decode-failed")
        return device_rows, errors

    return handle
