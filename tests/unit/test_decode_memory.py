"""Peak memory of one decode, measured in a fresh process per hostile input.

Each input is decoded in its own child process, which reports its peak RSS
(VmHWM) just before and just after the decode; the growth must stay under
``MAX_DECODE_BYTES``. The payloads are made by hand (a PNG header and a zlib stream
of zero rows, a JPEG of flat blocks) so that building 40 MP images costs little time
or memory here. A JPEG's full-size coefficient buffers count when libjpeg keeps them
(progressive or multi-scan), whatever scale it decodes at.

``STREAMER_DECODE_UNDER_TEST`` points the children at another copy of decode.py,
which is how the old, unbounded version was measured for comparison.
"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from PIL import Image

from streamer.errors import DecodeError
from streamer.vision.convert import MAX_DECODE_BYTES, check_budget, decode_bytes, draft_for_resize
from streamer.vision.decode import DecodeLimits, decode, open_image
from tests.hostile import png_chunk, zeros_zlib_stream

REPO = Path(__file__).resolve().parents[2]
MODULE = Path(
    os.environ.get("STREAMER_DECODE_UNDER_TEST", REPO / "streamer" / "vision" / "decode.py")
)
MB = 1024 * 1024

# The child's peak is VmHWM, not ``ru_maxrss``: Linux carries ``ru_maxrss`` across
# fork and exec, so a child of a big pytest process would start at its parent's size.
CHILD = """
import importlib.util, json, sys
import numpy as np

def peak():
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024

spec = importlib.util.spec_from_file_location("decode_under_test", sys.argv[1])
decode = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(decode)
with open(sys.argv[2], "rb") as f:
    payload = f.read()
out = np.empty((3, 224, 224), dtype=np.uint8)
before = peak()
try:
    decode.decode_into(payload, out, decode.DecodeLimits())
    outcome = "decoded"
except decode.DecodeError as exc:
    outcome = exc.reason
print(json.dumps({"outcome": outcome, "growth": peak() - before}))
"""


def png(
    width: int, height: int, depth: int, colour: int, extra: bytes = b"", *, rows: bool = True
) -> bytes:
    """A PNG of zero rows, or with ``rows=False`` of none (its header is all that is read).

    ``extra`` holds PLTE/tRNS chunks; ``colour`` is the PNG colour type.
    """
    samples = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[colour]
    row_bytes = width * samples * depth // 8
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    idat = zeros_zlib_stream(row_bytes, height) if rows else zlib.compress(b"")
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + extra
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


def flat(fmt: str, width: int, height: int, mode: str = "RGB", **params: Any) -> bytes:
    buffer = io.BytesIO()
    colours: dict[str, int | tuple[int, ...]] = {
        "L": 120,
        "RGB": (120, 80, 40),
        "CMYK": (120, 80, 40, 10),
    }
    Image.new(mode, (width, height), colours[mode]).save(buffer, fmt, quality=75, **params)
    return buffer.getvalue()


def mpo_rgb(width: int, height: int) -> bytes:
    """A progressive, unsubsampled RGB MPO: this picture, then a small second one."""
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (120, 80, 40)).save(
        buffer,
        "MPO",
        save_all=True,
        append_images=[Image.new("RGB", (64, 48))],
        progressive=True,
        subsampling=0,
    )
    return buffer.getvalue()


def jpeg_segment(marker: int, body: bytes) -> bytes:
    return bytes([0xFF, marker]) + struct.pack(">H", len(body) + 2) + body


def flat_jpeg(
    width: int,
    height: int,
    components: int,
    *,
    first_scan: int | None = None,
    progressive: bool = False,
    data: bool = True,
) -> bytes:
    """A sequential JPEG of one flat level, made by hand: Pillow writes no multi-scan file.

    Its Huffman tables have one code each, a single 0 bit, for "DC unchanged" and for
    "end of block", so every block is two 0 bits. The first scan holds ``first_scan``
    components (all by default) and each other component a scan of its own: fewer than
    all makes a multi-scan JPEG. ``data=False`` ends after the first scan's header, and
    only then may the frame be ``progressive`` (its first scan then codes DC alone).
    """
    assert not (data and progressive)
    ids = list(range(1, components + 1))
    frame = struct.pack(">BHHB", 8, height, width, components) + b"".join(
        bytes([i, 0x11, 0]) for i in ids
    )
    one_code = bytes([1] + [0] * 15) + b"\x00"  # one code of length 1, for symbol 0
    out = [
        b"\xff\xd8",
        jpeg_segment(0xDB, bytes(1) + bytes([1]) * 64),
        jpeg_segment(0xC2 if progressive else 0xC0, frame),
        jpeg_segment(0xC4, b"\x00" + one_code + b"\x10" + one_code),
    ]
    first = components if first_scan is None else first_scan
    blocks = -(-width // 8) * -(-height // 8)
    for group in [ids[:first], *([i] for i in ids[first:])]:
        spectrum = bytes([0, 0 if progressive else 63, 0])
        out.append(
            jpeg_segment(
                0xDA, bytes([len(group)]) + b"".join(bytes([i, 0]) for i in group) + spectrum
            )
        )
        if not data:
            return b"".join(out)
        bits = 2 * blocks * len(group)
        out.append(bytes(bits // 8) + (bytes([0xFF >> (bits % 8)]) if bits % 8 else b""))
    return b"".join(out) + b"\xff\xd9"


PALETTE = png_chunk(b"PLTE", bytes([200, 100, 50, 0, 0, 255])) + png_chunk(b"tRNS", b"\x80")

# name -> (payload builder, the outcome decode.py gives it, the least growth in MiB:
# proof that the decode really ran in the measured process).
CORPUS = {
    "png-16bit-grey-40mp": (lambda: png(8000, 5000, 16, 0), "decoded", 64),
    "png-rgba-40mp": (lambda: png(8000, 5000, 8, 6), "too-many-pixels", 0),
    "png-rgba-25mp": (lambda: png(5000, 5000, 8, 6), "decoded", 64),
    "png-palette-alpha-40mp": (lambda: png(8000, 5000, 8, 3, PALETTE), "decoded", 64),
    "png-rgb-40mp": (lambda: png(8000, 5000, 8, 2), "decoded", 64),
    "jpeg-40mp": (lambda: flat("JPEG", 8000, 5000), "decoded", 0),  # at 1/8 scale
    # libjpeg keeps every coefficient of a progressive or multi-scan JPEG (2 bytes a
    # sample, at full size) however small it decodes: 303 MiB for this CMYK one.
    "jpeg-cmyk-progressive-6300": (
        lambda: flat("JPEG", 6300, 6300, "CMYK", progressive=True),
        "too-many-pixels",
        0,
    ),
    "jpeg-cmyk-multi-scan-6300": (
        lambda: flat_jpeg(6300, 6300, 4, first_scan=1),
        "too-many-pixels",
        0,
    ),
    "jpeg-cmyk-6300": (lambda: flat("JPEG", 6300, 6300, "CMYK"), "decoded", 0),  # one scan
    # An MPO (a JPEG with more pictures) is decoded at full size: 137 MiB, and 206 MiB
    # of coefficients beside it.
    "mpo-rgb-progressive-6000": (lambda: mpo_rgb(6000, 6000), "too-many-pixels", 0),
    "jpeg-grey-progressive-40mp": (  # 76 MiB of coefficients
        lambda: flat("JPEG", 8000, 5000, "L", progressive=True),
        "decoded",
        64,
    ),
    "webp-12mp": (lambda: flat("WEBP", 4000, 3000), "decoded", 64),
    "png-1x40m-strip": (lambda: png(1, 40_000_000, 8, 0), "extreme-aspect-ratio", 0),
}


@pytest.mark.parametrize(
    ("width", "height", "depth", "colour", "fits"),
    [
        (8000, 5000, 8, 2, True),  # 40 MP RGB: 160 MB decoded
        (8000, 5000, 16, 0, True),  # 40 MP 16-bit grey: 80 MB, plus 40 MB of 8-bit grey
        (8000, 5000, 8, 4, True),  # 40 MP grey+alpha: 160 MB, plus 40 MB of grey
        (8000, 5000, 8, 6, False),  # 40 MP RGBA: 160 MB, plus 160 MB composited RGB
        (6000, 6000, 8, 6, False),  # 36 MP RGBA: 288 MB
        (5600, 5600, 8, 6, True),  # 31 MP RGBA: 251 MB
    ],
)
def test_budget_is_checked_on_the_header_before_any_decoding(
    width: int, height: int, depth: int, colour: int, fits: bool
) -> None:
    extra = png_chunk(b"PLTE", bytes(3)) if colour == 3 else b""
    payload = png(width, height, depth, colour, extra, rows=False)

    with pytest.raises(DecodeError) as caught:
        decode(payload)

    # Refused for its size, or else decoding began and found no rows.
    assert (caught.value.reason == "too-many-pixels") is not fits


@pytest.mark.parametrize(
    ("width", "height", "components", "first_scan", "fits"),
    [
        (6300, 6300, 4, "progressive", False),  # 303 MiB of coefficients
        (5800, 5800, 4, "progressive", False),  # 257 MiB
        (6300, 6300, 4, 1, False),  # the first scan one component: multi-scan
        (6300, 6300, 4, 3, False),
        (6300, 6300, 4, 4, True),  # one scan: a row of blocks at a time, at 1/8 scale
        (4000, 4000, 4, "progressive", True),  # 122 MiB
        (4000, 4000, 4, 1, True),
        (8000, 5000, 1, "progressive", True),  # 40 MP grey: 76 MiB
    ],
)
def test_jpeg_coefficient_buffers_are_budgeted_on_the_header(
    width: int, height: int, components: int, first_scan: int | str, fits: bool
) -> None:
    if first_scan == "progressive":
        payload = flat_jpeg(width, height, components, progressive=True, data=False)
    else:
        payload = flat_jpeg(width, height, components, first_scan=int(first_scan), data=False)

    with pytest.raises(DecodeError) as caught:
        decode(payload)

    # Refused for its size, or else decoding began and found no scan data.
    assert (caught.value.reason == "too-many-pixels") is not fits


@pytest.mark.parametrize("drafted", [True, False])
def test_coefficient_budget_holds_whatever_the_decode_scale(drafted: bool) -> None:
    image = open_image(flat_jpeg(6300, 6300, 4, progressive=True, data=False), DecodeLimits())
    if drafted:
        draft_for_resize(image)
        assert image.size == (788, 788)

    with pytest.raises(DecodeError) as caught:
        check_budget(image)

    assert caught.value.reason == "too-many-pixels"


def test_hand_made_multi_scan_jpeg_decodes_like_its_one_scan_twin() -> None:
    one_scan = decode(flat_jpeg(96, 64, 3))

    assert np.array_equal(decode(flat_jpeg(96, 64, 3, first_scan=1)), one_scan)
    assert one_scan.min() == one_scan.max()  # one flat level


def decode_in_child(payload: bytes, directory: Path) -> dict[str, Any]:
    """Decode ``payload`` in a fresh process: its outcome and peak RSS growth."""
    payload_path = directory / "payload"
    payload_path.write_bytes(payload)
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(MODULE), str(payload_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert child.returncode == 0, child.stderr
    result: dict[str, Any] = json.loads(child.stdout)
    return result


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
@pytest.mark.parametrize("name", list(CORPUS))
def test_decode_peak_memory_stays_under_the_budget(name: str, tmp_path: Path) -> None:
    build, expected, least_mib = CORPUS[name]

    result = decode_in_child(build(), tmp_path)
    print(f"{name}: {result['outcome']}, peak RSS +{result['growth'] / MB:.0f} MiB")

    assert result["growth"] >= least_mib * MB
    assert result["growth"] < MAX_DECODE_BYTES
    if "STREAMER_DECODE_UNDER_TEST" not in os.environ:
        assert result["outcome"] == expected


# The estimate against the measured peak: libjpeg and Pillow add a few MiB of their own.
SLACK = 8 * MB


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
@pytest.mark.skipif("STREAMER_DECODE_UNDER_TEST" in os.environ, reason="estimates this decode.py")
@settings(max_examples=12, deadline=None, database=None, derandomize=True)
@given(
    mode=st.sampled_from(["L", "RGB", "CMYK"]),
    size=st.tuples(st.integers(16, 3000), st.integers(16, 3000)),
    layout=st.sampled_from(["baseline", "progressive", "multi-scan"]),
    subsampling=st.sampled_from([0, 1, 2]),
)
@example(mode="CMYK", size=(3000, 3000), layout="progressive", subsampling=0)
@example(mode="RGB", size=(3000, 2000), layout="multi-scan", subsampling=0)
def test_decode_bytes_is_the_measured_peak_of_a_jpeg_decode(
    mode: str, size: tuple[int, int], layout: str, subsampling: int
) -> None:
    width, height = size
    if layout == "multi-scan" and mode != "L":
        payload = flat_jpeg(width, height, len(mode), first_scan=1)
    else:
        params: dict[str, Any] = {"progressive": layout != "baseline"}
        if mode == "RGB":
            params["subsampling"] = subsampling
        payload = flat("JPEG", width, height, mode, **params)
    image = open_image(payload, DecodeLimits())
    draft_for_resize(image)
    estimate = decode_bytes(image)
    image.close()

    with tempfile.TemporaryDirectory() as directory:
        result = decode_in_child(payload, Path(directory))

    assert result["outcome"] == "decoded"
    assert estimate - SLACK <= result["growth"] <= estimate + SLACK, (
        f"estimated {estimate / MB:.1f} MiB, measured {result['growth'] / MB:.1f} MiB"
    )
