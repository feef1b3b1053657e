"""Full-size work on a decoded image, kept within a memory budget.

A hostile image is small on the wire and huge once decoded. Everything here
deals with the full-size pixels before the resize: decoding a big JPEG at a
reduced scale (``draft_for_resize``), refusing an image whose full-size buffers
would not fit ``MAX_DECODE_BYTES`` (``check_budget``, header work only), and
converting to 8-bit "L" or "RGB" strip by strip (``to_working_mode``) so that a
16-bit or RGBA image never has three full-size copies at once.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from PIL import Image

from streamer.errors import DecodeError

RESIZE = 256
CROP = 224

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


def resized_size(width: int, height: int) -> tuple[int, int]:
    """Shorter side to 256, aspect kept, truncating like torchvision's resize."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = RESIZE, int(RESIZE * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


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
