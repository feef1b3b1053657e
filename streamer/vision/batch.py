"""One batch of shared-memory slots through the classifier.

Rows are gathered from the pixel slots by index; entries whose JPEG was left
encoded (``jpeg_decode`` on the device) are decoded first, batched, on the device
(``streamer.vision.device_decode``).

No image is decoded on the CPU here: that would keep the device waiting behind
CPU work. An entry the device could not decode is listed in the result's
``cpu_decode`` (its scores are void), and the engine has a decode worker decode it
on the CPU and sends it back in a later batch. The device decoder does not tell a
JPEG it cannot take from a broken one, so the CPU path decides which it is.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import numpy as np
import torch

from streamer.errors import DecodeError, InferenceFailed
from streamer.vision.classifier import BatchEntry, BatchResult, Classifier
from streamer.vision.device_decode import EncodedJpeg, JpegBatchDecoder

Payload = Callable[[int, int], memoryview]  # (slot, length) -> the slot's encoded bytes


def batch_handler(
    classifier: Classifier,
    decoder: JpegBatchDecoder,
    pixels_array: np.ndarray,
    payload: Payload,
) -> Callable[[list[BatchEntry]], BatchResult]:
    """A handler for the inference worker: slot entries in, one ``BatchResult`` out.

    The result has one row per entry, in order; the rows of ``cpu_decode`` are void.
    """
    pixels = torch.from_numpy(pixels_array)  # shares the segment, no copy

    def handle(entries: list[BatchEntry]) -> BatchResult:
        started = time.perf_counter()
        device_rows, cpu_decode = _decode_deferred(entries)
        if classifier.null:
            # The null model reads no pixels, so none is gathered: a GPU fed with JPEGs
            # decoded on the device gathers none either, and the host path measured with
            # this model is that one (150 KB a row copied would be the benchmark's own cost).
            batch: torch.Tensor | None = torch.empty((len(entries), 0), dtype=torch.uint8)
            device_rows = {}
        elif len(device_rows) == len(entries):
            batch = None  # every row was decoded on the device: nothing to gather or copy
        else:
            batch = pixels.index_select(
                0, torch.tensor([e.slot for e in entries], dtype=torch.long)
            )
        try:
            result = classifier.classify(batch, device_rows)
        except Exception as exc:  # e.g. CUDA out of memory: every record of the batch retries
            raise InferenceFailed(f"{type(exc).__name__}: {exc}") from exc
        return dataclasses.replace(
            result, cpu_decode=cpu_decode, handled_s=time.perf_counter() - started
        )

    def _decode_deferred(
        entries: list[BatchEntry],
    ) -> tuple[dict[int, torch.Tensor], tuple[int, ...]]:
        deferred = [(i, e) for i, e in enumerate(entries) if e.encoded_bytes]
        if not deferred:
            return {}, ()
        encoded = [
            EncodedJpeg(
                torch.frombuffer(payload(e.slot, e.encoded_bytes), dtype=torch.uint8),
                e.orientation,
            )
            for _, e in deferred
        ]
        device_rows: dict[int, torch.Tensor] = {}
        cpu_decode: list[int] = []
        for (i, _), decoded in zip(deferred, decoder.decode(encoded), strict=True):
            if isinstance(decoded, DecodeError):
                cpu_decode.append(i)
            else:
                device_rows[i] = decoded
        return device_rows, tuple(cpu_decode)

    return handle
