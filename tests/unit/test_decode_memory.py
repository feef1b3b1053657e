"""Peak memory of one decode, measured in a fresh process per hostile input.

Each input is decoded in its own child process, which reports its peak RSS
(VmHWM) just before and just after the decode; the growth must stay under
``MAX_DECODE_BYTES``. The payloads are made by hand (a PNG header and a zlib stream
of zero rows) so that building 40 MP images costs little time or memory here.

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
import zlib
from pathlib import Path

import pytest
from PIL import Image

from streamer.errors import DecodeError
from streamer.vision.convert import MAX_DECODE_BYTES
from streamer.vision.decode import decode
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


def flat(fmt: str, width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (120, 80, 40)).save(buffer, fmt, quality=75)
    return buffer.getvalue()


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


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
@pytest.mark.parametrize("name", list(CORPUS))
def test_decode_peak_memory_stays_under_the_budget(name: str, tmp_path: Path) -> None:
    build, expected, least_mib = CORPUS[name]
    payload_path = tmp_path / "payload"
    payload_path.write_bytes(build())

    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(MODULE), str(payload_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert child.returncode == 0, child.stderr
    result = json.loads(child.stdout)
    print(f"{name}: {result['outcome']}, peak RSS +{result['growth'] / MB:.0f} MiB")

    assert result["growth"] >= least_mib * MB
    assert result["growth"] < MAX_DECODE_BYTES
    if "STREAMER_DECODE_UNDER_TEST" not in os.environ:
        assert result["outcome"] == expected
