"""Decode and preprocess one encoded image into 224x224 RGB uint8 pixels.

This runs in decode worker processes, never on the event loop. The output is the
uint8 CHW tensor that torchvision's ``ResNet18_Weights.IMAGENET1K_V1.transforms()``
would turn into floats: resize the shorter side to 256 (bilinear, as PIL does it),
centre-crop 224. The inference worker then divides by 255 and normalises, so the
model sees exactly what the torchvision transform would give it.

Hostile input is refused before pixels are decoded: a format allow-list, a byte
limit and a pixel limit checked on the header, and for a JPEG a scan limit and
the size of its coefficient buffers, read from its markers (``jpeg_scans``).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from streamer.errors import DecodeError
from streamer.vision.convert import (
    COEFFICIENT_BYTES,
    CROP,
    MAX_JPEG_SCANS,
    check_budget,
    draft_for_resize,
    jpeg_scans,
    resized_size,
    to_working_mode,
)

EXIF_ORIENTATION = 0x0112
# Pillow opens a JPEG that carries more pictures (an MPF header: stereo, gain maps) as
# "MPO"; its first picture, the one decoded, is a JPEG from the first byte to its EOI.
JPEG_FORMATS = ("JPEG", "MPO")
DEVICE_JPEG_MODES = ("RGB", "L")  # JPEG colour modes the device decoder handles


@dataclass(frozen=True)
class DecodeLimits:
    max_payload_bytes: int = 8 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    allowed_formats: tuple[str, ...] = ("JPEG", "PNG", "WEBP")


def open_image(payload: bytes | memoryview, limits: DecodeLimits) -> Image.Image:
    """Open (not yet decode) a payload, enforcing the byte, format and pixel limits."""
    if len(payload) == 0:
        raise DecodeError("empty payload", reason="empty")
    if len(payload) > limits.max_payload_bytes:
        raise DecodeError(
            f"payload of {len(payload)} bytes exceeds {limits.max_payload_bytes}",
            reason="payload-too-large",
        )
    try:
        with warnings.catch_warnings():
            # Our own pixel limit below is stricter; Pillow's bomb warning is noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(payload), formats=list(limits.allowed_formats))
    except UnidentifiedImageError as exc:
        sniffed = sniff_format(payload)
        if sniffed is None:
            reason = "not-an-image"
        elif sniffed in limits.allowed_formats:
            reason = "corrupt"  # the right signature, but Pillow could not parse it
        else:
            reason = "unsupported-format"
        raise DecodeError(f"not a {'/'.join(limits.allowed_formats)} image", reason=reason) from exc
    except Image.DecompressionBombError as exc:
        raise DecodeError(str(exc), reason="too-many-pixels") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        # A plugin failed while parsing headers: cut short or corrupt.
        raise DecodeError(f"{type(exc).__name__}: {exc}", reason=_failure_reason(exc)) from exc
    width, height = image.size
    if width <= 0 or height <= 0:
        raise DecodeError(f"invalid dimensions {width}x{height}", reason="invalid-dimensions")
    if width * height > limits.max_image_pixels:
        raise DecodeError(
            f"{width}x{height} = {width * height} pixels exceeds {limits.max_image_pixels}",
            reason="too-many-pixels",
        )
    resized_w, resized_h = resized_size(width, height)
    if resized_w * resized_h > limits.max_image_pixels:
        # A 1x100000 strip is small, but resizing its short side to 256 is not.
        raise DecodeError(
            f"{width}x{height} would be resized to {resized_w}x{resized_h}, over "
            f"{limits.max_image_pixels} pixels",
            reason="extreme-aspect-ratio",
        )
    if image.format in JPEG_FORMATS:
        # Here, not in ``decode_opened``: a JPEG left to the inference device's decoder
        # is only opened by a decode worker, and the scan limit holds on both paths.
        scans = jpeg_scans(payload)
        if scans.count > MAX_JPEG_SCANS:
            image.close()
            raise DecodeError(
                f"JPEG with more than {MAX_JPEG_SCANS} scans: each is another pass over"
                " every coefficient of the image",
                reason="too-many-pixels",
            )
        image.info[COEFFICIENT_BYTES] = scans.coefficient_bytes
    return image


_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def resize_and_crop(
    image: Image.Image, size: tuple[int, int] | None = None, orientation: int = 1
) -> Image.Image:
    """Shorter side to 256 (bilinear), then the centre 224x224, as torchvision does.

    ``size`` is the resize target of the image as stored (a drafted JPEG is smaller
    than that). The EXIF ``orientation`` is applied to the resized image, not the
    full-size one: a full-size copy saved, and ``resized_size`` is symmetric.
    """
    size = size or resized_size(*image.size)
    if size != image.size:
        image = image.resize(size, Image.Resampling.BILINEAR)
    if orientation in _TRANSPOSE:
        image = image.transpose(_TRANSPOSE[orientation])
    width, height = image.size
    top = round((height - CROP) / 2.0)
    left = round((width - CROP) / 2.0)
    return image.crop((left, top, left + CROP, top + CROP))


def decode_into(payload: bytes | memoryview, out: np.ndarray, limits: DecodeLimits) -> None:
    """Decode ``payload`` and write 3x224x224 uint8 pixels into ``out`` (CHW)."""
    decode_opened(open_image(payload, limits), out)


def decode_opened(image: Image.Image, out: np.ndarray) -> None:
    """Decode an image from ``open_image`` into ``out`` (CHW), and close it.

    1. Seek the first frame; let a big JPEG decode at reduced scale (``draft``).
    2. Refuse it if its full-size buffers would exceed ``MAX_DECODE_BYTES``.
    3. Decode, convert to "L" or "RGB" in strips, drop the decoded image.
    4. Resize, apply the EXIF orientation, crop, and only then widen "L" to RGB.
    """
    try:
        if getattr(image, "n_frames", 1) > 1:
            image.seek(0)
        size = resized_size(*image.size)
        draft_for_resize(image)
        check_budget(image)
        image.load()  # raises on truncated data (ImageFile.LOAD_TRUNCATED_IMAGES stays False)
        orientation = image.getexif().get(EXIF_ORIENTATION, 1)
        working = to_working_mode(image)
        if working is not image:
            image.close()  # frees the decoded pixels before the resize
        if not isinstance(orientation, int):
            orientation = 1
        cropped = resize_and_crop(working, size, orientation)
        del working
        pixels = np.asarray(cropped.convert("RGB"), dtype=np.uint8)  # HWC
    except DecodeError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        # Pillow reports truncated and corrupt data as OSError/SyntaxError/ValueError.
        raise DecodeError(f"{type(exc).__name__}: {exc}", reason=_failure_reason(exc)) from exc
    except Image.DecompressionBombError as exc:
        raise DecodeError(str(exc), reason="too-many-pixels") from exc
    finally:
        image.close()
    out[...] = pixels.transpose(2, 0, 1)


def decode(payload: bytes | memoryview, limits: DecodeLimits | None = None) -> np.ndarray:
    """Convenience for tests and tools: decode into a fresh 3x224x224 array."""
    out = np.empty((3, CROP, CROP), dtype=np.uint8)
    decode_into(payload, out, limits or DecodeLimits())
    return out


def probe(image: Image.Image) -> int | None:
    """For device JPEG decoding: the EXIF orientation (1-8) of an opened JPEG that the
    device decoder can take, else None (the image is decoded here, on the CPU).

    Only header work: no pixels are decoded. Lives here, not in ``device_decode``,
    so that decode workers never import torch.
    """
    if image.format != "JPEG" or image.mode not in DEVICE_JPEG_MODES:
        return None
    orientation = image.getexif().get(EXIF_ORIENTATION, 1)
    return orientation if isinstance(orientation, int) and 1 <= orientation <= 8 else 1


def _failure_reason(exc: BaseException) -> str:
    return "truncated" if "truncated" in str(exc).lower() else "corrupt"


_SIGNATURES = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"8BPS", "PSD"),
)


def sniff_format(payload: bytes | memoryview) -> str | None:
    """The image format a payload's signature claims, or None when it looks like no image."""
    head = bytes(payload[:12])
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    for magic, name in _SIGNATURES:
        if head.startswith(magic):
            return name
    return None
