"""One batch of shared-memory slots through the classifier.

Rows are gathered from the pixel slots by index; entries whose JPEG was left
encoded (``jpeg_decode`` on the device) are decoded first, batched, on the device
(``streamer.vision.device_decode``). One the device cannot decode falls back to
the CPU path; one that fails there too is returned as that entry's ``DecodeError``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import torch

from streamer.errors import DecodeError, InferenceFailed
from streamer.vision.classifier import BatchEntry, BatchResult, Classifier
from streamer.vision.decode import DecodeLimits, decode_into
from streamer.vision.device_decode import EncodedJpeg, JpegBatchDecoder

Payload = Callable[[int, int], memoryview]  # (slot, length) -> the slot's encoded bytes


def batch_handler(
    classifier: Classifier,
    decoder: JpegBatchDecoder,
    pixels_array: np.ndarray,
    payload: Payload,
    limits: DecodeLimits,
) -> Callable[[list[BatchEntry]], BatchResult]:
    """A handler for the inference worker: slot entries in, one ``BatchResult`` out."""
    pixels = torch.from_numpy(pixels_array)  # shares the segment, no copy

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
                torch.frombuffer(payload(e.slot, e.encoded_bytes), dtype=torch.uint8),
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
                decode_into(payload(entry.slot, entry.encoded_bytes), batch[i].numpy(), limits)
            except DecodeError as exc:
                errors[i] = exc
            except Exception as exc:
                errors[i] = DecodeError(f"{type(exc).__name__}: {exc}", reason="decode-failed")
        return device_rows, errors

    return handle
