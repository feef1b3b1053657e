"""A fixed image corpus for the demo, tests and benchmarks.

Real photos come from scikit-image's bundled sample images (public domain or
permissively licensed, shipped inside the package: nothing is downloaded).
Variants are re-encoded as JPEG, PNG and WebP at several sizes, including the
500x375 and 224x224 sizes the benchmarks use; synthetic images (gradients and
noise, seeded) fill the corpus up to the requested count.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image

PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "camera",
    "horse",
    "motorcycle_left",
    "hubble_deep_field",
    "retina",
    "immunohistochemistry",
)
FORMATS = ("JPEG", "PNG", "WEBP")
EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


@dataclass(frozen=True)
class Sample:
    name: str
    data: bytes
    format: str


def photos() -> list[Image.Image]:
    """scikit-image's bundled colour and greyscale photos (needs the `samples` extra)."""
    try:
        from skimage import data
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            "sample photos need scikit-image: pip install 'streamer[samples]'"
        ) from exc
    images = []
    for name in PHOTOS:
        loader = getattr(data, name, None)
        if loader is None:
            continue
        try:
            array = loader()
        except Exception:
            continue
        if array.dtype != np.uint8:
            array = (
                (np.clip(array, 0, 1) * 255).astype(np.uint8)
                if array.dtype.kind == "f"
                else array.astype(np.uint8)
            )
        images.append(Image.fromarray(array))
    return images


def encode(image: Image.Image, fmt: str, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    options = {"quality": quality} if fmt in ("JPEG", "WEBP") else {}
    image.convert("RGB" if fmt == "JPEG" and image.mode not in ("L", "RGB") else image.mode).save(
        buffer, fmt, **options
    )
    return buffer.getvalue()


def synthetic(seed: int, size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(seed)
    width, height = size
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(0, 255, 3)
    freq = rng.uniform(0.005, 0.05, 3)
    channels = [(base[c] + 80 * np.sin(x * freq[c] + y * freq[(c + 1) % 3])) for c in range(3)]
    pixels = np.stack(channels, axis=-1) + rng.normal(0, 12, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def generate(
    count: int,
    seed: int = 0,
    sizes: tuple[tuple[int, int], ...] = ((500, 375), (224, 224)),
    formats: tuple[str, ...] = FORMATS,
) -> Iterator[Sample]:
    """``count`` samples: resized real photos first, then synthetic images."""
    rng = np.random.default_rng(seed)
    sources = photos()
    for i in range(count):
        fmt = formats[i % len(formats)]
        size = sizes[(i // len(formats)) % len(sizes)]
        if i < 4 * len(sources) * len(sizes):
            image = sources[(i // (len(formats) * len(sizes))) % len(sources)]
            # A random crop keeps variety between repeats of the same photo.
            w, h = image.size
            cw, ch = int(w * rng.uniform(0.7, 1.0)), int(h * rng.uniform(0.7, 1.0))
            left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            image = image.crop((left, top, left + cw, top + ch)).resize(
                size, Image.Resampling.BILINEAR
            )
            kind = "photo"
        else:
            image = synthetic(seed * 100_003 + i, size)
            kind = "synthetic"
        yield Sample(
            f"{i:04d}-{kind}-{size[0]}x{size[1]}.{EXTENSIONS[fmt]}", encode(image, fmt), fmt
        )
