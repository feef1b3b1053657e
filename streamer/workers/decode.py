"""Decode and preprocess one encoded image into 224x224 RGB uint8 pixels.

This runs in decode worker processes, never on the event loop. The output is the
uint8 CHW tensor that torchvision's ``ResNet18_Weights.IMAGENET1K_V1.transforms()``
would turn into floats: resize the shorter side to 256 (bilinear, as PIL does it),
centre-crop 224. The inference worker then divides by 255 and normalises, so the
model sees exactly what the torchvision transform would give it.

Hostile input is refused before pixels are decoded: a format allow-list, a byte
limit and a pixel limit checked on the header.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from streamer.errors import DecodeError

RESIZE = 256
CROP = 224
EXIF_ORIENTATION = 0x0112
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
    return image


# Bytes Pillow keeps per pixel for each mode it can decode ("RGB" is padded to 4).
_PIXEL_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}
_GREY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N"})
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA"})
# Pillow 13's WebP loader keeps libwebp's two RGBA canvases and the RGBA frame bytes
# alive next to the decoded image: three more 4-byte copies of every pixel.
_WEBP_EXTRA_PIXEL_BYTES = 12
STRIP_BYTES = 1024 * 1024  # size of one strip of a full-size conversion
# Every full-size buffer one decode holds at its peak must fit here (see
# ``decode_bytes``). 256 MiB takes a 40 MP RGB, greyscale, 16-bit or palette PNG and
# any JPEG up to the pixel limit (a big one is decoded at 1/2-1/8 scale), but refuses
# RGBA PNGs over ~33 MP and WebPs over ~16 MP: with one decode worker per
# core, the pixel limit alone let a worker take 450-650 MB.
MAX_DECODE_BYTES = 256 * 1024 * 1024

_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def working_mode(mode: str) -> str:
    """The mode a decoded image is resized in: "L" for greyscale, else "RGB"."""
    return "L" if mode in _GREY_MODES else "RGB"


def draft_for_resize(image: Image.Image) -> None:
    """Let libjpeg decode a big JPEG at 1/2, 1/4 or 1/8 scale (DCT scaling).

    Pillow picks the largest scale that keeps both sides at or above the resize
    target, so the shorter side never drops below 256 and the resize still only
    shrinks. Pixels differ slightly from a full decode (tests bound it); a JPEG whose
    shorter side is under 512 is decoded at full size, exactly as torchvision does.
    """
    if image.format == "JPEG" and min(image.size) >= 2 * RESIZE:
        image.draft(image.mode, resized_size(*image.size))


def decode_bytes(image: Image.Image) -> int:
    """Peak bytes of full-size buffers ``decode_opened`` holds for an opened image.

    Header work only (mode, size, format; after ``draft_for_resize``): the decoded
    image, the decoder's own copies (WebP), the full-size image in the working mode
    that the alpha composite, CMYK or 16-bit conversions write strip by strip, and
    the resize (its horizontal pass keeps every source row, then the resized image).
    """
    width, height = image.size
    pixels = width * height
    mode = image.mode
    work = working_mode(mode)
    work_bytes = 1 if work == "L" else 4
    total = pixels * _PIXEL_BYTES.get(mode, 4)
    if image.format == "WEBP":
        total += pixels * _WEBP_EXTRA_PIXEL_BYTES
    if mode != work:
        total += pixels * work_bytes
    resized_w, resized_h = resized_size(width, height)
    total += (resized_w * height + resized_w * resized_h) * work_bytes
    return total


def check_budget(image: Image.Image) -> None:
    needed = decode_bytes(image)
    if needed > MAX_DECODE_BYTES:
        width, height = image.size
        raise DecodeError(
            f"{image.format} {image.mode} {width}x{height} needs ~{needed >> 20} MiB to "
            f"decode, over the {MAX_DECODE_BYTES >> 20} MiB budget",
            reason="too-many-pixels",
        )


def scale_to_8bit(values: np.ndarray, peak: int) -> np.ndarray:
    """``round(values * 255 / peak)`` in integers, halves to even as ``np.round`` does."""
    quotient, remainder = np.divmod(values.astype(np.int64) * 255, peak)
    twice = 2 * remainder
    quotient += (twice > peak) | ((twice == peak) & (quotient % 2 == 1))
    return quotient.astype(np.uint8)


def composite_on_black(strip: Image.Image) -> Image.Image:
    """Alpha over opaque black: a plain RGB convert would drop alpha and show whatever
    colour hides under transparent pixels (often garbage in the encoder's output)."""
    strip = strip.convert("RGBA")
    background = Image.new("RGBA", strip.size, (0, 0, 0, 255))
    return Image.alpha_composite(background, strip)


def to_working_mode(image: Image.Image) -> Image.Image:
    """A loaded image as 8-bit "L" or "RGB", converted in strips where it is big.

    Every conversion here is per pixel, so a strip at a time gives the same pixels as
    converting the whole image, with one full-size output instead of three or four.
    """
    mode = image.mode
    work = working_mode(mode)
    if mode == work:
        return image
    if mode == "P" and "transparency" in image.info:
        return _palette_on_black(image)
    if mode in ("1", "P"):
        return image.convert(work)  # one byte in, the output is the only new copy
    if mode.startswith("I;16"):
        peak = 65535
    elif mode == "I":
        peak = 1  # the brightest pixel; one pass of strips to find it
        for strip in _strips(image):
            peak = max(peak, int(np.asarray(strip, dtype=np.uint32).max()))
    out = Image.new(work, image.size)
    for top, strip in zip(range(0, image.height, _strip_rows(image)), _strips(image), strict=True):
        if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
            # 16/32-bit greyscale: scale to 8 bits instead of clipping (which turns white).
            values = np.asarray(strip, dtype=np.uint32 if mode == "I" else np.uint16)
            piece = Image.fromarray(scale_to_8bit(values, peak), mode="L")
        elif mode in _ALPHA_MODES:
            piece = composite_on_black(strip).convert(work)
        else:
            piece = strip.convert(work)  # CMYK, YCbCr, ...
        out.paste(piece, (0, top))
    return out


def _palette_on_black(image: Image.Image) -> Image.Image:
    """Composite a palette image with transparency by compositing its palette.

    Each index maps to one colour and alpha, so compositing the 256 entries gives
    the same pixels as compositing the full-size RGBA image, which is never built.
    """
    entries = Image.new("P", (256, 1))
    entries.putpalette(image.getpalette() or [])
    entries.info["transparency"] = image.info["transparency"]
    entries.putdata(list(range(256)))
    colours = composite_on_black(entries).convert("RGB")
    del image.info["transparency"]  # the image is ours and closed after this
    image.putpalette(colours.tobytes(), rawmode="RGB")
    return image.convert("RGB")


def _strip_rows(image: Image.Image) -> int:
    return max(1, STRIP_BYTES // (4 * image.width))


def _strips(image: Image.Image) -> Iterator[Image.Image]:
    rows = _strip_rows(image)
    for top in range(0, image.height, rows):
        yield image.crop((0, top, image.width, min(top + rows, image.height)))


def resized_size(width: int, height: int) -> tuple[int, int]:
    """Shorter side to 256, aspect kept, truncating like torchvision's resize."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = RESIZE, int(RESIZE * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


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
