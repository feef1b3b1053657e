"""The inference worker's batch handler, without processes: a JPEG the device cannot
decode is handed back for a decode worker, never decoded on the CPU in the handler."""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
import pytest
import torch
from PIL import Image

from streamer import corpus
from streamer.bench.device_check import encoded
from streamer.vision import batch as batch_module
from streamer.vision.batch import batch_handler
from streamer.vision.classifier import BatchEntry, BatchResult, Classifier, InferenceConfig
from streamer.vision.device_decode import JpegBatchDecoder
from streamer.vision.models import WeightsSpec

pytestmark = pytest.mark.timeout(60)


def jpeg(seed: int) -> bytes:
    buffer = io.BytesIO()
    corpus.synthetic(seed, (400, 300)).save(buffer, "JPEG")
    return buffer.getvalue()


def handler(
    payloads: list[bytearray], pixels: np.ndarray, weights: str = "random:0"
) -> tuple[Classifier, Callable[[list[BatchEntry]], BatchResult]]:
    """A classifier and the inference worker's handler over these payload and pixel slots."""
    classifier = Classifier(InferenceConfig(WeightsSpec.parse(weights), warmup_batch=1))
    handle = batch_handler(
        classifier,
        JpegBatchDecoder("cpu"),
        pixels,
        lambda slot, length: memoryview(payloads[slot])[:length],
    )
    return classifier, handle


def test_a_jpeg_the_device_cannot_decode_is_reported_for_the_cpu_and_not_decoded_here(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    good = jpeg(1)
    truncated = jpeg(2)[: len(jpeg(2)) // 2]  # its header is fine, its data cut short
    assert Image.open(io.BytesIO(truncated)).size == (400, 300)
    payloads = [bytearray(good), bytearray(truncated), bytearray()]
    pixels = np.zeros((3, 3, 224, 224), dtype=np.uint8)
    pixels[2] = 90  # slot 2 was decoded by a decode worker

    cpu_decodes: list[int] = []
    monkeypatch.setattr(
        batch_module, "decode_into", lambda *a: cpu_decodes.append(1), raising=False
    )
    _, handle = handler(payloads, pixels)
    entries = [BatchEntry(0, len(good), 1), BatchEntry(1, len(truncated), 1), BatchEntry(2)]

    result = handle(entries)

    assert cpu_decodes == [], "the inference worker decoded on the CPU"
    assert result.cpu_decode == (1,)
    assert len(result.indices) == len(result.scores) == len(entries)
    assert np.all(pixels[1] == 0)  # nothing was written for it either


def test_a_batch_the_device_decodes_entirely_has_no_cpu_work() -> None:
    payloads = [bytearray(jpeg(3)), bytearray(jpeg(4))]
    _, handle = handler(payloads, np.zeros((2, 3, 224, 224), dtype=np.uint8))
    result = handle([BatchEntry(i, len(p), 1) for i, p in enumerate(payloads)])
    assert result.cpu_decode == ()
    assert len(result.indices) == 2


def test_a_batch_the_device_decodes_entirely_reads_no_pixel_slot() -> None:
    """Found on an H200: gathering and copying 256 unused pixel rows cost 10 ms a batch,
    more than the forward pass (6.5 ms). With every row decoded on the device the pixel
    segment is not read at all: here it has no rows, so any read would fail."""
    payloads = [bytearray(jpeg(7)), bytearray(jpeg(8))]
    classifier, handle = handler(payloads, np.zeros((0, 3, 224, 224), dtype=np.uint8))
    result = handle([BatchEntry(i, len(p), 1) for i, p in enumerate(payloads)])
    decoded = JpegBatchDecoder("cpu").decode([encoded(bytes(p)) for p in payloads])
    expected = classifier.classify(torch.stack(decoded))  # type: ignore[arg-type]
    assert result.indices == expected.indices


def test_the_null_model_reads_no_pixel_slot() -> None:
    """The host-path benchmark's null model must not cost the worker a 150 KB copy per
    row that a GPU fed with device-decoded JPEGs does not make: no pixel is read (the
    segment here has no rows), and every row still gets the null model's scores."""
    _, handle = handler([], np.zeros((0, 3, 224, 224), dtype=np.uint8), weights="null")
    result = handle([BatchEntry(slot) for slot in (5, 9, 2)])
    assert result.cpu_decode == ()
    assert result.indices == [[0, 1, 2, 3, 4]] * 3  # NullModel: class 0 first, then 1, ...


def test_the_handled_time_counts_the_device_decode_as_well_as_the_forward_pass() -> None:
    """The latency-target policy sizes batches by what a batch costs the worker: with
    JPEGs decoded on the device that is more than the forward pass alone."""
    payloads = [bytearray(jpeg(5)), bytearray(jpeg(6))]
    _, handle = handler(payloads, np.zeros((2, 3, 224, 224), dtype=np.uint8))
    result = handle([BatchEntry(i, len(p), 1) for i, p in enumerate(payloads)])
    assert result.cpu_decode == ()
    assert result.handled_s > result.forward_s > 0
