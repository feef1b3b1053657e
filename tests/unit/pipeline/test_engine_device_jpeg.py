"""The engine with JPEGs decoded by the inference worker (the GPU path), run on the CPU."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from streamer import corpus
from streamer.config import Settings
from streamer.errors import DecodeError
from streamer.metrics import Metrics
from streamer.pipeline.engine import Engine

pytestmark = pytest.mark.timeout(240)


def settings(jpeg_decode: str) -> Settings:
    return Settings(
        weights="random:0",
        device="cpu",
        jpeg_decode=jpeg_decode,
        decode_workers=1,
        max_in_flight=16,
        max_batch_size=8,
        inference_standby=False,
    )


async def test_device_decoded_jpegs_classify_like_cpu_decoded_ones() -> None:
    jpegs = [s.data for s in corpus.generate(12, seed=5) if s.data[:3] == b"\xff\xd8\xff"][:4]
    png = io.BytesIO()
    corpus.synthetic(9, (320, 240)).save(png, "PNG")
    payloads = [*jpegs, png.getvalue()]

    results = {}
    for mode in ("cpu", "device"):
        async with Engine(settings(mode), Metrics()) as engine:
            assert engine.device_jpeg is (mode == "device")
            results[mode] = [await engine.classify(p) for p in payloads]

    for on_cpu, on_device in zip(results["cpu"], results["device"], strict=True):
        # Pixels differ by a level here and there, scores by about 1e-4 relative.
        assert on_device.indices == on_cpu.indices
        for a, b in zip(on_device.scores, on_cpu.scores, strict=True):
            assert abs(a - b) <= 1e-3 * b


async def test_a_jpeg_that_fails_on_the_device_and_the_cpu_is_a_dead_letter() -> None:
    good = io.BytesIO()
    corpus.synthetic(3, (400, 300)).save(good, "JPEG")
    # The header is fine (so the decode worker defers it); the data is cut short.
    truncated = good.getvalue()[: len(good.getvalue()) // 2]
    assert Image.open(io.BytesIO(truncated)).size == (400, 300)
    async with Engine(settings("device"), Metrics()) as engine:
        with pytest.raises(DecodeError) as info:
            await engine.classify(truncated)
        assert info.value.reason == "truncated"
        assert (await engine.classify(good.getvalue())).batch_size >= 1  # the engine goes on
