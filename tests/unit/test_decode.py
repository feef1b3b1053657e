"""Tests for ``streamer.vision.decode``: torchvision parity, modes and hostile input.

Every payload is built in memory with Pillow, numpy or by hand (the PNG headers,
JPEGs with scans copied).
"""

from __future__ import annotations

import io
import math
import os
import re
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import psutil
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageOps
from PIL.JpegImagePlugin import JpegImageFile
from torchvision.models import ResNet18_Weights
from torchvision.transforms import functional as TF

from streamer import corpus
from streamer.config import Settings
from streamer.errors import DecodeError
from streamer.vision.convert import (
    MAX_JPEG_SCANS,
    draft_for_resize,
    jpeg_scans,
    resized_size,
    scale_to_8bit,
)
from streamer.vision.decode import DecodeLimits, decode, decode_into
from tests.hostile import grey_png, zeros_zlib_stream

OUT_SHAPE = (3, 224, 224)
ORIENTATION = 0x0112  # EXIF tag
MB = 1024 * 1024


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    """A gradient with noise on top, so resizing and JPEG/WebP coding have work to do."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    base = np.stack(
        [xs * 255 // max(width - 1, 1), ys * 255 // max(height - 1, 1), (xs + ys) % 256], axis=-1
    )
    pixels = np.clip(base + rng.integers(-40, 40, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def halves(
    width: int, height: int, left: tuple[int, ...], right: tuple[int, ...], mode: str
) -> Image.Image:
    image = Image.new(mode, (width, height), left)
    image.paste(right, (width // 2, 0, width, height))
    return image


@contextmanager
def rss_peak_growth() -> Iterator[Callable[[], int]]:
    """Sample this process's RSS from a thread; yields a getter for the peak growth."""
    process = psutil.Process()
    base = peak = process.memory_info().rss
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, process.memory_info().rss)
            done.wait(0.001)

    sampler = threading.Thread(target=sample, name="rss-sampler", daemon=True)
    sampler.start()
    try:
        yield lambda: peak - base
    finally:
        done.set()
        sampler.join()
        peak = max(peak, process.memory_info().rss)


def reason_of(payload: bytes, limits: DecodeLimits | None = None) -> str:
    with pytest.raises(DecodeError) as caught:
        decode(payload, limits)
    assert caught.value.stage == "decode"
    return caught.value.reason


def colour_at(pixels: np.ndarray, y: int, x: int) -> tuple[int, ...]:
    return tuple(int(v) for v in pixels[:, y, x])


def assert_close(actual: tuple[int, ...], expected: tuple[int, ...], tolerance: int) -> None:
    assert all(abs(a - e) <= tolerance for a, e in zip(actual, expected, strict=True)), (
        actual,
        expected,
    )


# --- 1. parity with torchvision ---------------------------------------------------

FORMATS = {
    "JPEG": {"quality": 90},
    "PNG": {},
    "WEBP": {"quality": 80},
}
SIZES = [(320, 240), (240, 320), (300, 300), (100, 80), (256, 384)]


@pytest.fixture(scope="module")
def torchvision_transform() -> Callable[[Image.Image], torch.Tensor]:
    return ResNet18_Weights.IMAGENET1K_V1.transforms()


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_matches_torchvision_transform_exactly(
    fmt: str,
    size: tuple[int, int],
    torchvision_transform: Callable[[Image.Image], torch.Tensor],
) -> None:
    payload = encode(noise(*size, seed=size[0] * size[1]), fmt, **FORMATS[fmt])

    pixels = decode(payload)

    assert pixels.shape == OUT_SHAPE
    assert pixels.dtype == np.uint8
    ours = TF.normalize(
        torch.from_numpy(pixels).float().div(255),
        mean=torchvision_transform.mean,
        std=torchvision_transform.std,
    )
    theirs = torchvision_transform(Image.open(io.BytesIO(payload)).convert("RGB"))
    assert theirs.shape == ours.shape
    assert (ours - theirs).abs().max().item() < 1e-6


def test_memoryview_payload_decodes_like_bytes() -> None:
    payload = encode(noise(120, 90), "PNG")
    assert np.array_equal(decode(memoryview(payload)), decode(payload))


def test_decode_into_writes_one_slot_of_a_batch() -> None:
    batch = np.zeros((3, *OUT_SHAPE), dtype=np.uint8)
    payload = encode(noise(120, 90), "PNG")

    decode_into(payload, batch[1], DecodeLimits())

    assert np.array_equal(batch[1], decode(payload))
    assert not batch[0].any() and not batch[2].any()


# --- 2. modes ----------------------------------------------------------------------


def test_greyscale_becomes_three_equal_channels() -> None:
    grey = noise(160, 120).convert("L")

    pixels = decode(encode(grey, "PNG"))

    assert np.array_equal(pixels[0], pixels[1]) and np.array_equal(pixels[1], pixels[2])
    assert np.array_equal(pixels, decode(encode(grey.convert("RGB"), "PNG")))


def test_16bit_greyscale_is_scaled_not_clipped_to_white() -> None:
    gradient = np.linspace(0, 65535, 300 * 300).round().astype(np.uint16).reshape(300, 300)
    image = Image.fromarray(gradient)
    assert image.mode == "I;16"

    pixels = decode(encode(image, "PNG"))

    assert 100 < pixels.mean() < 155  # clipping would give ~255 almost everywhere
    assert pixels[:, 0, :].max() < pixels[:, -1, :].min()  # still a top-to-bottom ramp


def test_16bit_mid_grey_maps_to_128() -> None:
    image = Image.fromarray(np.full((64, 64), 32768, dtype=np.uint16))

    pixels = decode(encode(image, "PNG"))

    assert pixels.min() >= 127 and pixels.max() <= 129


def test_cmyk_jpeg_converts_like_pillow() -> None:
    payload = encode(noise(160, 120).convert("CMYK"), "JPEG", quality=95)
    reference = Image.open(io.BytesIO(payload))
    assert reference.mode == "CMYK"
    expected = decode(encode(reference.convert("RGB"), "PNG"))

    pixels = decode(payload)

    assert np.abs(pixels.astype(np.int16) - expected).max() <= 1


def test_cmyk_jpeg_keeps_a_flat_colour() -> None:
    payload = encode(Image.new("RGB", (64, 48), (200, 60, 30)).convert("CMYK"), "JPEG", quality=95)

    pixels = decode(payload)

    assert_close(colour_at(pixels, 112, 112), (200, 60, 30), tolerance=6)


# Left half transparent, right half opaque; sample well away from the seam.
LEFT, RIGHT = (112, 40), (112, 184)


def test_palette_transparency_composites_on_black() -> None:
    image = Image.new("P", (200, 100), 0)
    image.putpalette([255, 0, 0, 0, 255, 0])
    image.paste(1, (100, 0, 200, 100))

    pixels = decode(encode(image, "PNG", transparency=0))

    assert colour_at(pixels, *LEFT) == (0, 0, 0)
    assert colour_at(pixels, *RIGHT) == (0, 255, 0)


def test_rgba_transparent_pixels_become_black() -> None:
    image = halves(200, 100, (255, 0, 0, 0), (0, 0, 255, 255), "RGBA")

    pixels = decode(encode(image, "PNG"))

    assert colour_at(pixels, *LEFT) == (0, 0, 0)
    assert colour_at(pixels, *RIGHT) == (0, 0, 255)


def test_rgba_half_transparent_pixels_are_blended_with_black() -> None:
    image = Image.new("RGBA", (64, 64), (200, 100, 50, 128))

    pixels = decode(encode(image, "PNG"))

    assert_close(colour_at(pixels, 112, 112), (100, 50, 25), tolerance=1)


def test_la_transparent_pixels_become_black() -> None:
    image = halves(200, 100, (200, 0), (200, 255), "LA")

    pixels = decode(encode(image, "PNG"))

    assert colour_at(pixels, *LEFT) == (0, 0, 0)
    assert colour_at(pixels, *RIGHT) == (200, 200, 200)


# --- 2b. same pixels as the whole-image pipeline ----------------------------------
# Conversions now run in strips, the palette is composited instead of the image and
# greyscale is resized before it is widened to RGB; none of that may change a pixel.


def whole_image_pipeline(payload: bytes) -> np.ndarray:
    """The decode as it was before the memory budget: every step on the full image."""
    image = Image.open(io.BytesIO(payload))
    image.load()
    image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        array = np.asarray(image, dtype=np.uint32 if mode == "I" else np.uint16)
        peak = 65535 if mode.startswith("I;16") else max(int(array.max()), 1)
        scaled = (array.astype(np.float64) * (255.0 / peak)).round().astype(np.uint8)
        image = Image.fromarray(scaled, mode="L")
    elif mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, image)
    image = image.convert("RGB")
    image = image.resize(resized_size(*image.size), Image.Resampling.BILINEAR)
    top, left = round((image.height - 224) / 2.0), round((image.width - 224) / 2.0)
    cropped = image.crop((left, top, left + 224, top + 224))
    return np.asarray(cropped, dtype=np.uint8).transpose(2, 0, 1)


def with_alpha(image: Image.Image, seed: int) -> Image.Image:
    alpha = np.random.default_rng(seed).integers(0, 256, (image.height, image.width))
    image.putalpha(Image.fromarray(alpha.astype(np.uint8), "L"))
    return image


def mode_payloads() -> dict[str, bytes]:
    # 600x1000: a 4-byte image this wide is converted in three strips.
    image = noise(600, 1000, seed=11)
    grey16 = np.asarray(image.convert("L"), dtype=np.uint16) * 257 + 90
    return {
        "rgba": encode(with_alpha(image.copy(), 1), "PNG"),
        "la": encode(with_alpha(image.convert("L"), 2), "PNG"),
        "palette-one-transparent": encode(image.quantize(16), "PNG", transparency=3),
        "palette-alpha-table": encode(
            image.quantize(16), "PNG", transparency=bytes(range(0, 256, 16))
        ),
        "grey-16bit": encode(Image.fromarray(grey16), "PNG"),
        "bilevel": encode(image.convert("1"), "PNG"),
        "grey": encode(image.convert("L"), "PNG"),
        # Under 512 pixels on its shorter side, so decoded at full size (no draft).
        "cmyk-jpeg": encode(image.crop((0, 0, 500, 1000)).convert("CMYK"), "JPEG", quality=90),
        "webp-alpha": encode(with_alpha(image.copy(), 3), "WEBP", lossless=True),
    }


MODE_PAYLOADS = mode_payloads()


@pytest.mark.parametrize("name", list(MODE_PAYLOADS))
def test_strip_conversions_match_the_whole_image_pipeline(name: str) -> None:
    payload = MODE_PAYLOADS[name]
    assert np.array_equal(decode(payload), whole_image_pipeline(payload))


def test_16bit_scaling_in_integers_matches_the_float64_formula() -> None:
    values = np.arange(65536, dtype=np.uint16)
    old = (values.astype(np.float64) * (255.0 / 65535)).round().astype(np.uint8)

    assert np.array_equal(scale_to_8bit(values, 65535), old)


@pytest.mark.parametrize("peak", [1, 2, 255, 1000, 65535, 2**24 + 3, 2**32 - 1])
def test_32bit_scaling_in_integers_matches_the_float64_formula(peak: int) -> None:
    rng = np.random.default_rng(peak % 1000)
    values = rng.integers(0, peak, 10_000, endpoint=True, dtype=np.uint64).astype(np.uint32)
    values[:3] = (0, peak, peak // 2)
    old = (values.astype(np.float64) * (255.0 / peak)).round().astype(np.uint8)

    assert np.array_equal(scale_to_8bit(values, peak), old)


# --- 2c. reduced-scale JPEG decoding ----------------------------------------------


@pytest.mark.parametrize(
    ("size", "drafted"),
    [
        ((511, 600), (511, 600)),
        ((512, 700), (256, 350)),
        ((2000, 1500), (500, 375)),
        ((8000, 5000), (1000, 625)),
        ((3000, 520), (1500, 260)),
    ],
)
def test_big_jpegs_decode_at_a_scale_that_keeps_256_pixels(
    size: tuple[int, int], drafted: tuple[int, int]
) -> None:
    image = Image.open(io.BytesIO(encode(Image.new("RGB", size, (9, 9, 9)), "JPEG")))

    draft_for_resize(image)

    assert image.size == drafted
    assert min(image.size) >= 256


def test_reduced_scale_jpeg_stays_close_to_a_full_decode() -> None:
    # 2000x1500 is decoded at 1/4 scale (500x375) before the resize to 341x256.
    photo = noise(500, 375, seed=5).resize((2000, 1500), Image.Resampling.BICUBIC)
    payload = encode(photo, "JPEG", quality=90)

    ours = decode(payload).astype(np.int16)
    full = whole_image_pipeline(payload).astype(np.int16)
    difference = np.abs(ours - full)
    print(f"draft vs full decode: mean |diff| {difference.mean():.3f}, max {difference.max()}")

    assert difference.mean() < 1.5  # measured: 0.70 on this image (max 9)


# --- 3. EXIF orientation -----------------------------------------------------------


def test_exif_orientation_is_applied() -> None:
    # Landscape, red top-left quadrant; Orientation=6 means "rotate 90 degrees
    # clockwise to display", which moves the red quadrant to the top right.
    stored = np.zeros((96, 128, 3), dtype=np.uint8)
    stored[:] = (0, 0, 255)
    stored[:48, :64] = (255, 0, 0)
    image = Image.fromarray(stored)
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    upright = decode(encode(image.transpose(Image.Transpose.ROTATE_270), "PNG"))

    pixels = decode(encode(image, "JPEG", quality=95, exif=exif))

    assert_close(colour_at(pixels, 20, 200), (255, 0, 0), tolerance=12)
    for y, x in ((20, 20), (200, 20), (200, 200)):
        assert_close(colour_at(pixels, y, x), (0, 0, 255), tolerance=12)
    # JPEG chroma subsampling blurs the quadrant edge; elsewhere it must agree.
    assert np.abs(pixels.astype(np.int16) - upright).mean() < 4


@pytest.mark.parametrize("orientation", range(2, 9))
def test_orientation_after_the_resize_is_within_one_level(orientation: int) -> None:
    # The transpose moved from the full-size image to the resized one; only the
    # rounding of the two bilinear passes (now in the other order) may differ.
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    payload = encode(noise(400, 300, seed=orientation), "PNG", exif=exif)

    difference = np.abs(decode(payload).astype(np.int16) - whole_image_pipeline(payload))

    assert difference.max() <= 1


# --- 4. animation ------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["WEBP", "PNG"])
def test_animated_image_decodes_its_first_frame(fmt: str) -> None:
    frames = [
        Image.new("RGB", (80, 60), colour) for colour in ((255, 0, 0), (0, 0, 255), (0, 255, 0))
    ]
    payload = encode(
        frames[0],
        fmt,
        save_all=True,
        append_images=frames[1:],
        duration=100,
        **({"lossless": True} if fmt == "WEBP" else {}),
    )
    assert getattr(Image.open(io.BytesIO(payload)), "n_frames", 1) == 3

    pixels = decode(payload)

    assert colour_at(pixels, 112, 112) == (255, 0, 0)


# --- 5. rejections -----------------------------------------------------------------


def test_empty_payload_is_rejected() -> None:
    assert reason_of(b"") == "empty"


def test_random_bytes_are_not_an_image() -> None:
    payload = np.random.default_rng(7).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    assert reason_of(payload) == "not-an-image"


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF"])
def test_valid_image_outside_the_allow_list_is_unsupported(fmt: str) -> None:
    assert reason_of(encode(noise(64, 48), fmt)) == "unsupported-format"


@pytest.mark.parametrize("fmt", ["WEBP", "PNG"])
def test_allowed_format_removed_from_the_allow_list_is_unsupported(fmt: str) -> None:
    only_jpeg = DecodeLimits(allowed_formats=("JPEG",))
    assert reason_of(encode(noise(64, 48), fmt), only_jpeg) == "unsupported-format"


def test_allowed_signature_with_garbage_behind_it_is_corrupt() -> None:
    assert reason_of(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64) in {"corrupt", "truncated"}


def test_jpeg_cut_in_its_scan_data_is_truncated() -> None:
    payload = encode(noise(320, 240), "JPEG", quality=90)
    assert reason_of(payload[: len(payload) // 2]) in {"truncated", "corrupt"}


@pytest.mark.parametrize(
    ("fmt", "keep_bytes"),
    [("WEBP", 1000), ("JPEG", 100), ("PNG", 20)],
    ids=["webp-in-bitstream", "jpeg-in-dqt", "png-in-ihdr"],
)
def test_file_cut_while_its_header_is_parsed_raises_decode_error(
    fmt: str,
    keep_bytes: int,
) -> None:
    payload = encode(noise(160, 120), fmt, **FORMATS[fmt])
    assert len(payload) > 2 * keep_bytes
    assert reason_of(payload[:keep_bytes]) in {"truncated", "corrupt"}


def test_payload_over_the_byte_limit_is_rejected() -> None:
    payload = encode(noise(64, 48), "PNG")

    assert reason_of(payload, DecodeLimits(max_payload_bytes=len(payload) - 1)) == (
        "payload-too-large"
    )
    assert decode(payload, DecodeLimits(max_payload_bytes=len(payload))).shape == OUT_SHAPE


def timed_rejection(payload: bytes) -> tuple[str, float, int]:
    """The dead-letter reason, the seconds it took and the peak RSS growth meanwhile."""
    with rss_peak_growth() as growth:
        started = time.perf_counter()
        reason = reason_of(payload)
        elapsed = time.perf_counter() - started
    return reason, elapsed, growth()


def test_huge_header_is_rejected_fast_without_decoding() -> None:
    payload = grey_png(100_000, 100_000, zlib.compress(b"\x00" * 100))

    reason, elapsed, growth = timed_rejection(payload)
    print(f"10^10-pixel header rejected in {elapsed * 1000:.1f} ms, RSS +{growth / MB:.1f} MB")

    assert reason == "too-many-pixels"
    assert elapsed < 0.5  # a loose bound for a shared CI machine; the figure is printed
    assert growth < 50 * MB


def test_pixel_limit_is_inclusive() -> None:
    payload = encode(noise(300, 300), "PNG")

    assert decode(payload, DecodeLimits(max_image_pixels=300 * 300)).shape == OUT_SHAPE
    assert reason_of(payload, DecodeLimits(max_image_pixels=300 * 300 - 1)) == ("too-many-pixels")


# --- 6. decompression bomb ---------------------------------------------------------


def test_decompression_bomb_is_rejected_fast_and_small() -> None:
    # 20000x20000 zeros: 400 MB of pixels in ~390 KB, well under the 8 MiB byte limit.
    payload = grey_png(20_000, 20_000, zeros_zlib_stream(20_000, 20_000))
    assert len(payload) < DecodeLimits().max_payload_bytes

    reason, elapsed, growth = timed_rejection(payload)
    print(f"decompression bomb rejected in {elapsed * 1000:.1f} ms, RSS +{growth / MB:.1f} MB")

    assert reason == "too-many-pixels"
    assert elapsed < 0.5  # a loose bound for a shared CI machine; the figure is printed
    assert growth < 100 * MB


def test_thin_strip_is_refused_before_it_is_resized() -> None:
    # 1000 pixels in 90 bytes, inside every source limit; with its short side resized
    # to 256 it would be a 256x256000 image (65.5M pixels, ~260 MB).
    payload = encode(Image.new("RGB", (1, 1000), (90, 90, 90)), "PNG")

    with rss_peak_growth() as growth:
        reason = reason_of(payload)

    assert reason == "extreme-aspect-ratio"
    assert growth() < 100 * MB


def test_resized_size_limit_is_inclusive() -> None:
    limits = DecodeLimits(max_image_pixels=300 * 300)
    # 100x137 resizes to 256x350 = 89600 pixels; 100x138 to 256x353 = 90368.
    assert decode(encode(noise(100, 137), "PNG"), limits).shape == OUT_SHAPE
    assert reason_of(encode(noise(100, 138), "PNG"), limits) == "extreme-aspect-ratio"


# --- 6b. progressive JPEGs: one pass over the image per scan -------------------------
# libjpeg walks every block of a scan's components once per scan, however little data
# the scan holds, so a small file of many scans costs minutes; more than
# MAX_JPEG_SCANS are refused from the markers alone.


def scan_units(jpeg: bytes) -> tuple[bytes, list[bytes], bytes]:
    """A progressive JPEG from Pillow as (headers, one unit per scan, EOI).

    A unit is a scan's SOS segment and data, with the DHT segment before it if any,
    so a copy placed right after it decodes with the same tables. Pillow's entropy
    data stuffs every 0xFF and its tables hold no 0xFF, so markers are found by search.
    """
    starts = [m.start() for m in re.finditer(rb"\xff[\xc4\xda\xd9]", jpeg)]
    first_sos = next(i for i in starts if jpeg[i + 1] == 0xDA)
    eoi = starts[-1]
    assert jpeg[eoi:] == b"\xff\xd9"
    cuts = [
        i
        for n, i in enumerate(starts)
        if first_sos <= i < eoi
        and (jpeg[i + 1] == 0xC4 or (jpeg[i + 1] == 0xDA and jpeg[starts[n - 1] + 1] == 0xDA))
    ]
    cuts = sorted({first_sos, *cuts})
    units = [jpeg[a:b] for a, b in zip(cuts, [*cuts[1:], eoi], strict=True)]
    return jpeg[:first_sos], units, jpeg[eoi:]


def with_scans(jpeg: bytes, total: int, copied: int = -1) -> bytes:
    """``jpeg`` with copies of one scan (the last by default) until it has ``total``."""
    head, units, eoi = scan_units(jpeg)
    extra = total - len(units)
    assert extra >= 0
    index = copied % len(units)
    units[index:index] = [units[index]] * extra
    return head + b"".join(units) + eoi


def progressive(image: Image.Image, **params: object) -> bytes:
    return encode(image, "JPEG", progressive=True, **params)


SMALL_PROGRESSIVE = progressive(noise(48, 32, seed=9), quality=90)


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    return corpus.photos()


def test_progressive_photo_decodes_to_the_pixels_of_its_baseline_encoding(
    photos: list[Image.Image],
) -> None:
    # Progressive coding only reorders the same coefficients, so the pixels are exact.
    assert photos
    for photo in photos:
        payload = progressive(photo, quality=90)

        pixels = decode(payload)

        assert 1 < jpeg_scans(payload).count <= MAX_JPEG_SCANS
        assert np.array_equal(pixels, decode(encode(photo, "JPEG", quality=90))), photo.size


def test_pillow_writes_fewer_scans_than_the_limit_allows() -> None:
    for mode in ("L", "RGB", "CMYK"):
        count = jpeg_scans(progressive(Image.new(mode, (64, 64)))).count
        assert 1 < count <= MAX_JPEG_SCANS // 5, (mode, count)


def test_scan_limit_is_inclusive(monkeypatch: pytest.MonkeyPatch) -> None:
    at_limit = with_scans(SMALL_PROGRESSIVE, MAX_JPEG_SCANS)
    over = with_scans(SMALL_PROGRESSIVE, MAX_JPEG_SCANS + 1)

    assert decode(at_limit).shape == OUT_SHAPE

    def never(self: JpegImageFile) -> None:
        raise AssertionError("the image was decoded")

    monkeypatch.setattr(JpegImageFile, "load", never)
    assert reason_of(over) == "too-many-pixels"  # from its markers: nothing decoded


def test_mpo_first_picture_is_held_to_the_scan_limit() -> None:
    # Pillow opens a JPEG with an MPF header as "MPO"; its first picture is decoded.
    buffer = io.BytesIO()
    noise(48, 32, seed=1).save(
        buffer, "MPO", save_all=True, append_images=[noise(48, 32, seed=2)], progressive=True
    )
    mpo = buffer.getvalue()
    first_end = mpo.index(b"\xff\xd9\xff\xd8") + 2
    at_limit = with_scans(mpo[:first_end], MAX_JPEG_SCANS) + mpo[first_end:]
    over = with_scans(mpo[:first_end], MAX_JPEG_SCANS + 1) + mpo[first_end:]
    assert Image.open(io.BytesIO(over)).format == "MPO"

    assert decode(at_limit).shape == OUT_SHAPE
    assert reason_of(over) == "too-many-pixels"


SCAN_DECOY = (
    b"\xff\xfe"
    + (4 + 2 * (MAX_JPEG_SCANS + 1)).to_bytes(2, "big")
    + (b"\xff\xd9" + b"\xff\xda" * (MAX_JPEG_SCANS + 1))
)  # a comment holding a false EOI and more false SOS markers than the limit


@settings(max_examples=40, deadline=None, database=None, derandomize=True)
@given(
    total=st.integers(1, 2 * MAX_JPEG_SCANS),
    copied=st.integers(0, 50),
    decoy=st.sampled_from(["none", "before-the-scans", "between-scans"]),
    trailer=st.booleans(),
)
def test_scan_limit_counts_the_scans_libjpeg_reads(
    total: int, copied: int, decoy: str, trailer: bool
) -> None:
    head, units, _ = scan_units(SMALL_PROGRESSIVE)
    real = max(total, len(units))
    payload = with_scans(SMALL_PROGRESSIVE, real, copied)
    if decoy == "before-the-scans":
        payload = payload.replace(head, head + SCAN_DECOY, 1)
    elif decoy == "between-scans":
        payload = payload.replace(units[0], units[0] + SCAN_DECOY, 1)
    if trailer:  # data after EOI (a gain map, a video) is never read by libjpeg
        payload += with_scans(SMALL_PROGRESSIVE, MAX_JPEG_SCANS + 1)

    if real > MAX_JPEG_SCANS:
        assert reason_of(payload) == "too-many-pixels"
    else:
        assert decode(payload).shape == OUT_SHAPE


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_many_scans_would_outlast_the_worker_timeouts_and_are_refused_unread() -> None:
    # 40 MP of flat grey, the most pixels the limit allows: each copied scan is ~65 bytes.
    base = progressive(Image.new("L", (8000, 5000), 90))
    _, units, _ = scan_units(base)
    started = time.perf_counter()
    decode(base)
    base_s = time.perf_counter() - started
    at_limit = with_scans(base, MAX_JPEG_SCANS)
    started = time.perf_counter()
    decode(at_limit)
    limit_s = time.perf_counter() - started
    per_scan_s = (limit_s - base_s) / (MAX_JPEG_SCANS - len(units))
    timeout_s = Settings.model_fields["worker_timeout_s"].default
    attempts = Settings.model_fields["max_record_attempts"].default
    hung_scans = math.ceil(attempts * timeout_s / per_scan_s)
    payload_scans = (DecodeLimits().max_payload_bytes - len(base)) // len(units[-1])
    print(
        f"{per_scan_s * 1000:.1f} ms a scan; {MAX_JPEG_SCANS} scans decode in {limit_s:.1f} s;"
        f" {hung_scans} scans ({hung_scans * len(units[-1]) // 1024} KiB) outlast"
        f" {attempts} x {timeout_s:.0f} s; the payload limit holds {payload_scans}"
    )

    assert limit_s < timeout_s / 2  # the most scans accepted stay well inside a deadline
    assert hung_scans < payload_scans  # a file under the byte limit hangs a worker each time
    reason, elapsed, _ = timed_rejection(with_scans(base, hung_scans))
    assert reason == "too-many-pixels"
    assert elapsed < 1.0  # a loose bound for a shared CI machine; decoding takes minutes


# --- 7. fuzzing --------------------------------------------------------------------


def seed_payloads() -> dict[str, bytes]:
    """One small valid payload per decoder path: formats, modes, EXIF and animation."""
    image = noise(56, 40, seed=3)
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    frames = [
        Image.new("RGBA", (30, 20), colour) for colour in ((255, 0, 0, 128), (0, 0, 255, 255))
    ]
    animated = {"save_all": True, "append_images": frames[1:], "duration": 100}
    grey16 = Image.fromarray(np.asarray(image.convert("L"), dtype=np.uint16) * 257)
    return {
        "jpeg-exif": encode(image, "JPEG", quality=90, exif=exif),
        "jpeg-cmyk": encode(image.convert("CMYK"), "JPEG"),
        "jpeg-progressive": encode(image, "JPEG", quality=90, progressive=True),
        "png": encode(image, "PNG"),
        "png-palette": encode(image.quantize(16), "PNG", transparency=0),
        "png-16bit": encode(grey16, "PNG"),
        "apng": encode(frames[0], "PNG", **animated),
        "webp": encode(image, "WEBP", quality=80),
        "webp-lossless": encode(image, "WEBP", lossless=True),
        "webp-animated": encode(frames[0], "WEBP", **animated),
    }


SEEDS = seed_payloads()


def assert_decodes_or_refuses(payload: bytes) -> None:
    try:
        pixels = decode(payload)
    except DecodeError as exc:
        assert exc.stage == "decode"
    else:
        assert pixels.shape == OUT_SHAPE
        assert pixels.dtype == np.uint8


@st.composite
def mutated_seeds(draw: st.DrawFn) -> bytes:
    data = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "truncate", "insert"]))
        position = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[position] = draw(st.integers(0, 255))
        elif op == "truncate":
            data = data[: max(position, 1)]
        else:
            data[position:position] = draw(st.binary(min_size=1, max_size=8))
    return bytes(data)


# CI runs a bounded, repeatable fuzz (200 fixed examples); `make fuzz` sets
# STREAMER_FUZZ_EXAMPLES high and lets Hypothesis pick new inputs each run.
FUZZ_EXAMPLES = int(os.environ.get("STREAMER_FUZZ_EXAMPLES", "200"))
FUZZ = settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    database=None,
    derandomize="STREAMER_FUZZ_EXAMPLES" not in os.environ,
    suppress_health_check=[HealthCheck.too_slow],
)


@FUZZ
@given(st.binary(max_size=4096))
def test_random_bytes_never_escape_as_other_errors(payload: bytes) -> None:
    assert_decodes_or_refuses(payload)


# Pillow warns (UserWarning) about mangled metadata it then skips: EXIF blocks from
# its TIFF parser ("Corrupt EXIF data", "Tag data larger than file") and broken APNG
# chunks ("Invalid APNG, will use default PNG image"). Outside pytest's
# warnings-as-errors these are log lines, not failures, so they are ignored here.
@pytest.mark.filterwarnings("ignore::UserWarning:PIL.TiffImagePlugin")
@pytest.mark.filterwarnings("ignore:Invalid APNG:UserWarning")
@settings(FUZZ, report_multiple_bugs=False)
@given(mutated_seeds())
def test_mutated_images_never_escape_as_other_errors(payload: bytes) -> None:
    assert_decodes_or_refuses(payload)


@FUZZ
@given(st.binary(max_size=2048))
def test_scan_walk_takes_any_bytes(tail: bytes) -> None:
    scans = jpeg_scans(b"\xff\xd8" + tail)

    assert 0 <= scans.count <= MAX_JPEG_SCANS + 1
    assert scans.coefficient_bytes >= 0
