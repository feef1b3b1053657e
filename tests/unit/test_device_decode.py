"""Device JPEG decoding, run on the CPU: it must match the CPU path it replaces on a GPU."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from streamer import corpus
from streamer.errors import ConfigError, DecodeError
from streamer.vision import devices
from streamer.vision.decode import decode
from streamer.vision.device_decode import (
    EXIF_ORIENTATION,
    EncodedJpeg,
    JpegBatchDecoder,
    probe,
    resize_and_crop,
    resize_and_crop_all,
)
from streamer.vision.devices import check_jpeg_library, installed, jpeg_on_device

pytestmark = pytest.mark.timeout(60)

# Same bytes, same libjpeg: only the resize differs (tensor vs Pillow), by a level or so.
MAX_LEVEL_DIFF = 2


def jpeg(image: Image.Image, orientation: int = 1, **options: object) -> bytes:
    exif = Image.Exif()
    if orientation != 1:
        exif[EXIF_ORIENTATION] = orientation
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=95, exif=exif, **options)
    return buffer.getvalue()


def encoded(data: bytes) -> EncodedJpeg:
    orientation = probe(Image.open(io.BytesIO(data)))
    assert orientation is not None
    return EncodedJpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), orientation)


def assert_close_to_cpu_path(pixels: torch.Tensor, data: bytes) -> None:
    reference = decode(data).astype(np.int16)
    assert pixels.shape == (3, 224, 224) and pixels.dtype == torch.uint8
    diff = np.abs(pixels.numpy().astype(np.int16) - reference)
    assert diff.max() <= MAX_LEVEL_DIFF, f"max diff {diff.max()}"


# Both libraries run here on the CPU (nvImageCodec with its libjpeg-turbo backend); the
# GPU run checks them on the device (docs/BENCHMARKS.md).
LIBRARY = pytest.mark.parametrize(
    "library",
    [
        "torchvision",
        pytest.param(
            "nvimgcodec",
            marks=pytest.mark.skipif(
                not installed("nvidia.nvimgcodec"), reason="nvImageCodec is not installed"
            ),
        ),
    ],
)


@LIBRARY
def test_a_batch_of_photos_matches_the_cpu_path(library: str) -> None:
    photos = [s.data for s in corpus.generate(30, seed=4) if s.data[:3] == b"\xff\xd8\xff"]
    assert len(photos) >= 5
    out = JpegBatchDecoder("cpu", library).decode([encoded(d) for d in photos])
    for pixels, data in zip(out, photos, strict=True):
        assert isinstance(pixels, torch.Tensor)
        assert_close_to_cpu_path(pixels, data)


@LIBRARY
@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_is_applied_like_pillow(orientation: int, library: str) -> None:
    # Asymmetric content and size, so a wrong flip or rotation cannot pass.
    rgb = corpus.synthetic(orientation, (360, 250))
    rgb.paste((255, 0, 0), (0, 0, 90, 40))
    data = jpeg(rgb, orientation)
    assert probe(Image.open(io.BytesIO(data))) == orientation
    [pixels] = JpegBatchDecoder("cpu", library).decode([encoded(data)])
    assert isinstance(pixels, torch.Tensor)
    assert_close_to_cpu_path(pixels, data)


@LIBRARY
def test_greyscale_jpegs_come_out_rgb(library: str) -> None:
    data = jpeg(corpus.synthetic(3, (300, 300)).convert("L"))
    [pixels] = JpegBatchDecoder("cpu", library).decode([encoded(data)])
    assert isinstance(pixels, torch.Tensor)
    assert_close_to_cpu_path(pixels, data)


@LIBRARY
def test_a_broken_jpeg_fails_alone_and_the_rest_of_the_batch_decodes(library: str) -> None:
    good = jpeg(corpus.synthetic(1, (400, 300)))
    bad = good[: len(good) // 2]
    out = JpegBatchDecoder("cpu", library).decode([encoded(good), encoded(bad), encoded(good)])
    assert isinstance(out[1], DecodeError)
    assert isinstance(out[0], torch.Tensor) and isinstance(out[2], torch.Tensor)
    assert_close_to_cpu_path(out[0], good)


def test_resizing_a_batch_by_groups_of_one_size_gives_each_image_s_own_pixels() -> None:
    """The grouped resize (one call per size, found 9x faster for 256 images on an H200)
    must give exactly what resizing each image alone gives, whatever the order of sizes."""
    sizes = [(375, 500), (300, 400), (375, 500), (224, 224), (500, 375), (375, 500)]
    images = [
        torch.from_numpy(np.array(corpus.synthetic(i, (w, h)))).permute(2, 0, 1).contiguous()
        for i, (h, w) in enumerate(sizes)
    ]
    grouped = resize_and_crop_all(images)
    assert len(grouped) == len(images)
    for image, out in zip(images, grouped, strict=True):
        assert torch.equal(out, resize_and_crop(image))
    assert resize_and_crop_all([]) == []


def test_a_missing_optional_library_is_a_config_error_at_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(devices.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="pip install nvidia-nvimgcodec-cu13"):
        check_jpeg_library("nvimgcodec")
    check_jpeg_library("torchvision")  # always there


def test_only_jpegs_the_device_decoder_takes_are_deferred() -> None:
    rgb = corpus.synthetic(2, (64, 64))
    png = io.BytesIO()
    rgb.save(png, "PNG")
    assert probe(Image.open(png)) is None
    cmyk = io.BytesIO()
    rgb.convert("CMYK").save(cmyk, "JPEG")
    assert probe(Image.open(cmyk)) is None  # stays on the (exact) CPU path
    assert probe(Image.open(io.BytesIO(jpeg(rgb)))) == 1


def test_auto_decodes_jpegs_on_cuda_devices_only() -> None:
    assert jpeg_on_device("auto", ["cuda:0", "cuda:1"])
    assert not jpeg_on_device("auto", ["cpu"])
    assert jpeg_on_device("device", ["cpu"])
    assert not jpeg_on_device("cpu", ["cuda:0"])
    with pytest.raises(ConfigError):
        jpeg_on_device("gpu", ["cuda:0"])
