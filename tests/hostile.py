"""Hostile payloads, crafted by hand: shared by the decode unit tests and the chaos tests."""

from __future__ import annotations

import os
import struct
import zlib


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def grey_png(width: int, height: int, idat: bytes) -> bytes:
    """A hand-made 8-bit greyscale PNG: the header says what we like, whatever IDAT holds."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


def zeros_zlib_stream(width: int, height: int, rows_per_block: int = 1000) -> bytes:
    """The zlib stream of ``height`` all-zero 8-bit rows, without compressing them all.

    One block of rows is deflated once, ending in a full flush (no back-references
    across it), then repeated: ~400 MB of zeros for the price of 20 MB.
    """
    assert height % rows_per_block == 0
    block = bytes((width + 1) * rows_per_block)  # each row: filter byte 0 + pixels
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    segment = deflate.compress(block) + deflate.flush(zlib.Z_FULL_FLUSH)
    adler = 1
    for _ in range(height // rows_per_block):
        adler = zlib.adler32(block, adler)
    return (
        b"\x78\xda"
        + segment * (height // rows_per_block)
        + deflate.flush()
        + struct.pack(">I", adler)
    )


def hostile_payloads(valid_jpeg: bytes) -> dict[str, tuple[bytes, str]]:
    """name -> (payload, the dead-letter reason it must get), with default limits."""
    return {
        "truncated": (valid_jpeg[: len(valid_jpeg) // 2], "truncated"),
        "random-bytes": (os.urandom(4096), "not-an-image"),
        "empty": (b"", "empty"),
        "png-claims-1e9-pixels": (grey_png(40_000, 25_000, zlib.compress(b"")), "too-many-pixels"),
        "decompression-bomb": (
            grey_png(20_000, 20_000, zeros_zlib_stream(20_000, 20_000)),
            "too-many-pixels",
        ),
        "oversized": (os.urandom(900 * 1024), "payload-too-large"),
    }
