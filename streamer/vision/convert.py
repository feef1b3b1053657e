"""Full-size work on a decoded image, kept within a memory budget.

A hostile image is small on the wire and huge once decoded. Everything here
deals with the full-size pixels before the resize: decoding a big JPEG at a
reduced scale (``draft_for_resize``), refusing an image whose full-size buffers
would not fit ``MAX_DECODE_BYTES`` (``check_budget``, header work only), and
converting to 8-bit "L" or "RGB" strip by strip (``to_working_mode``) so that a
16-bit or RGBA image never has three full-size copies at once.

Before any pixel of a JPEG is decoded, ``jpeg_scans`` walks its markers as libjpeg
will. Invariants: a progressive or multi-scan JPEG is budgeted for the full-size
coefficient buffers libjpeg keeps while it loads, whatever the reduced scale; and
no JPEG with more than ``MAX_JPEG_SCANS`` scans is decoded, since each scan is
another pass over every block of its components.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

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
# libjpeg walks every block of a scan's components once per scan, even when the scan
# holds almost no data: ~40 ms a scan of ~65 bytes on a 40 MP image, so a file under
# the 8 MiB payload limit could take an hour, and 420 KiB outlast three worker
# timeouts. Encoders write 10 scans (libjpeg's progressive default) to a few dozen
# (mozjpeg); Skia, Chrome's decoder, gives up at 100. 100 scans cost ~4 s at 40 MP.
MAX_JPEG_SCANS = 100
# ``Image.info`` key under which ``open_image`` leaves ``JpegScans.coefficient_bytes``.
COEFFICIENT_BYTES = "coefficient_bytes"


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
    image and the decoder's own copies (WebP), plus the larger of what the load and
    what follows it add. The load adds a JPEG's coefficient buffers (the
    ``COEFFICIENT_BYTES`` that ``open_image`` read; freed when the load ends). After
    it come the full-size image in the working mode that the alpha composite, CMYK
    or 16-bit conversions write strip by strip, and the resize (its horizontal pass
    keeps every source row, then the resized image).
    """
    width, height = image.size
    pixels = width * height
    mode = image.mode
    work = working_mode(mode)
    work_bytes = 1 if work == "L" else 4
    total = pixels * _PIXEL_BYTES.get(mode, 4)
    if image.format == "WEBP":
        total += pixels * _WEBP_EXTRA_PIXEL_BYTES
    after_load = pixels * work_bytes if mode != work else 0
    resized_w, resized_h = resized_size(width, height)
    after_load += (resized_w * height + resized_w * resized_h) * work_bytes
    return total + max(int(image.info.get(COEFFICIENT_BYTES, 0)), after_load)


def check_budget(image: Image.Image) -> None:
    needed = decode_bytes(image)
    if needed > MAX_DECODE_BYTES:
        width, height = image.size
        coefficients = int(image.info.get(COEFFICIENT_BYTES, 0))
        held = f" (full-size coefficients: ~{coefficients >> 20} MiB)" if coefficients else ""
        raise DecodeError(
            f"{image.format} {image.mode} {width}x{height} needs ~{needed >> 20} MiB to "
            f"decode{held}, over the {MAX_DECODE_BYTES >> 20} MiB budget",
            reason="too-many-pixels",
        )


# A marker as libjpeg finds one outside a marker segment: 0xFF, any 0xFF fill bytes,
# then a code that is neither stuffing (0x00) nor a restart marker (0xD0-0xD7), which
# entropy-coded data holds and which change nothing here.
_MARKER = re.compile(rb"\xff\xff*([^\x00\xd0-\xd7\xff])")
_NOT_A_SEGMENT = frozenset({0x00, 0xFF, *range(0xD0, 0xD8)})
_NO_LENGTH = frozenset({0x01, 0xD8})  # TEM and SOI: markers without a segment
_SOS, _EOI = 0xDA, 0xD9
_FRAMES = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # SOF0-SOF15 (not DHT, JPG, DAC)
_PROGRESSIVE_FRAMES = frozenset({0xC2, 0xC6, 0xCA, 0xCE})
_BLOCK_BYTES = 64 * 2  # one 8x8 block of 16-bit coefficients


@dataclass(frozen=True)
class JpegScans:
    """What libjpeg will read from a JPEG: its scans and the buffers they need."""

    count: int  # SOS markers up to EOI; counting stops at MAX_JPEG_SCANS + 1
    coefficient_bytes: int  # full-size coefficient buffers held while loading (else 0)


def jpeg_scans(data: bytes | memoryview) -> JpegScans:
    """Walk a JPEG's markers from SOI to EOI as libjpeg does, without decoding.

    A marker segment is skipped by its length; everything else (entropy-coded data,
    junk) is searched for the next marker, so a marker-like pair inside a segment
    (a comment, an EXIF thumbnail) is not counted, and nothing after EOI is.
    """
    end = len(data)
    pos = 2  # past SOI
    count = scan_components = 0
    frame: bytes | None = None
    progressive = False
    while count <= MAX_JPEG_SCANS:
        if pos + 1 < end and data[pos] == 0xFF and data[pos + 1] not in _NOT_A_SEGMENT:
            code = data[pos + 1]  # the usual case: a segment right after the last one
            pos += 2
        else:
            found = _MARKER.search(data, pos)
            if found is None:
                break
            code = data[found.end() - 1]
            pos = found.end()
        if code == _EOI:
            break
        if code in _NO_LENGTH:
            continue
        length = int.from_bytes(data[pos : pos + 2], "big")
        if code == _SOS:
            count += 1
            if count == 1 and pos + 2 < end:
                scan_components = data[pos + 2]
        elif code in _FRAMES and frame is None:  # libjpeg refuses a second frame header
            frame = bytes(data[pos + 2 : pos + length])
            progressive = code in _PROGRESSIVE_FRAMES
        pos += max(length, 2)
    if frame is None or count == 0:
        return JpegScans(count, 0)  # libjpeg stops at the headers: no buffers
    return JpegScans(count, _coefficient_bytes(frame, progressive, scan_components))


def _coefficient_bytes(frame: bytes, progressive: bool, scan_components: int) -> int:
    """Bytes of the whole-image coefficient arrays libjpeg allocates for this frame.

    A sequential JPEG whose first scan holds every component is decoded a row of
    blocks at a time. A progressive one, or one whose first scan leaves a component
    for a later scan, keeps every block of every component until the last scan:
    per component, its size in blocks at its sampling factors, rounded up to whole
    MCUs. The draft scale only shrinks the output, never these arrays.
    """
    if len(frame) < 6:
        return 0
    height, width = int.from_bytes(frame[1:3], "big"), int.from_bytes(frame[3:5], "big")
    declared = frame[5]
    if not progressive and scan_components >= declared:
        return 0
    sampling = [(byte >> 4, byte & 15) for byte in frame[7 : 6 + 3 * declared : 3]]
    if not sampling or any(not (1 <= h <= 4 and 1 <= v <= 4) for h, v in sampling):
        return 0  # libjpeg refuses such a frame before it allocates anything
    max_h = max(h for h, _ in sampling)
    max_v = max(v for _, v in sampling)
    blocks = 0
    for h, v in sampling:
        wide = -(-width * h // (8 * max_h))
        high = -(-height * v // (8 * max_v))
        blocks += -(-wide // h) * h * (-(-high // v) * v)
    return blocks * _BLOCK_BYTES


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
