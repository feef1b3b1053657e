"""Everything the service uses of aiokafka beyond its public API, and what stands in for it.

aiokafka has no public hooks for what the service needs, so the places that reach into
its internals are here and nowhere else, each pinned by ``tests/unit/test_compat.py``
against the installed version (``pyproject.toml`` allows 0.12 up to 0.14, whose
fetcher, record reader and group state are alike):

- the fetcher's two record classes: ``MemoryRecords``, which it builds from each
  partition's fetch response, and ``PartitionRecords``, which here first tells those
  records the offset the fetch started at;
- aiokafka's own (C or Python) reader of one v2 record batch, the fast path;
- the consumer's coordinator and subscription state: whether it is a working group
  member, and where it fetches next, without a request.

Two parts of aiokafka's reading cannot be used, so they are done here the same way:

- its codecs inflate without a limit. ``inflate`` reads the same formats (gzip with the
  standard library; snappy raw or in xerial blocks, lz4 frames and zstd with cramjam,
  the library of aiokafka's extras) into a buffer of bounded size, and raises
  ``BatchTooLarge`` before a batch costs more memory than the cap;
- its v0/v1 reader restarts on every ``iter()`` and inflates without a limit:
  ``legacy_records`` reads those message sets (offsets, timestamps as it does).
"""

from __future__ import annotations

import mmap
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import aiokafka.consumer.fetcher as fetcher
import cramjam
from aiokafka import AIOKafkaConsumer
from aiokafka.errors import CorruptRecordException, UnsupportedCodecError
from aiokafka.record.default_records import DefaultRecordBatch
from aiokafka.structs import TopicPartition

GZIP, SNAPPY, LZ4, ZSTD = 1, 2, 3, 4  # the codec bits of a batch's attributes
SLACK = 16  # zero bytes kept after every buffer a record reader reads
_XERIAL_HEADER = b"\x82SNAPPY\x00" + struct.pack(">ii", 1, 1)
_GZIP_STEP = 1 << 16  # bytes inflated per zlib call: the most held beside the buffer
_STOCK_PARTITION_RECORDS: Any = fetcher.PartitionRecords
_LEGACY = struct.Struct(">qiIbb")  # offset, size, crc, magic, attributes; v1: a timestamp
_INT32, _INT64 = struct.Struct(">i"), struct.Struct(">q")
_CODEC, _LOG_APPEND_TIME = 0x07, 0x08


@dataclass(frozen=True)
class WireRecord:
    """One record as aiokafka's fetcher reads it (the attributes it uses)."""

    offset: int
    timestamp: int | None
    timestamp_type: int | None
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes | None]]
    checksum: None = None


class BatchTooLarge(ValueError):
    """A compressed batch whose records inflate past the cap (a decompression bomb)."""


class _PositionedPartitionRecords(_STOCK_PARTITION_RECORDS):  # type: ignore[misc]
    """aiokafka's ``PartitionRecords``, which first tells its records where the fetch began."""

    def __init__(
        self, tp: TopicPartition, records: Any, aborted: Any, fetch_offset: int, *rest: Any
    ) -> None:
        start_at = getattr(records, "start_at", None)
        if start_at is not None:
            start_at(fetch_offset)
        super().__init__(tp, records, aborted, fetch_offset, *rest)


def install_fetch_reader(records: Callable[[bytes], Any]) -> None:
    """Make aiokafka's fetcher read every fetch response with ``records`` (idempotent)."""
    fetcher.MemoryRecords = records  # type: ignore[misc,assignment]
    fetcher.PartitionRecords = _PositionedPartitionRecords  # type: ignore[misc]


def stock_batch(buffer: memoryview) -> Any:
    """aiokafka's reader of the v2 batch in ``buffer``; iterate it once only (the C one
    asserts on a second ``iter()``). It may read a varint up to 9 bytes past the end,
    so the memory after ``buffer`` must hold ``SLACK`` more bytes."""
    return DefaultRecordBatch(buffer)


def group_state(consumer: AIOKafkaConsumer) -> tuple[bool, int, bool]:
    """(a coordinator is known, the group generation, an assignment is held)."""
    coordinator = consumer._coordinator
    if coordinator is None:
        return False, -1, False
    subscription = consumer._subscription.subscription
    assigned = subscription is not None and subscription.assignment is not None
    return coordinator.coordinator_id is not None, int(coordinator.generation), assigned


def fetch_position(consumer: AIOKafkaConsumer, tp: TopicPartition) -> int | None:
    """The next offset the consumer fetches from ``tp`` (None while unknown), without the
    request aiokafka's public ``position`` may send."""
    subscription = consumer._subscription.subscription
    assignment = None if subscription is None else subscription.assignment
    if assignment is None or tp not in assignment.tps:
        return None
    state = assignment.state_value(tp)
    return int(state.position) if state.has_valid_position else None


def inflate(
    codec: int, data: memoryview, cap: int, prefix: bytes = b"", magic: int = 2
) -> memoryview:
    """``prefix`` followed by ``data`` inflated with ``codec``, as a buffer with ``SLACK``
    zero bytes after it; ``BatchTooLarge`` when more than ``cap`` bytes would come out."""
    if codec == GZIP:
        return _gunzip(data, _Output(prefix, cap))
    if codec == SNAPPY:
        return _unsnappy(data, prefix, cap)
    if codec == LZ4 and magic == 0:  # v0 lz4 frames carry a broken header checksum
        raise UnsupportedCodecError("lz4 in message format v0 is not supported")
    if codec in (LZ4, ZSTD):
        out = _Output(prefix, cap)
        library = cramjam.lz4 if codec == LZ4 else cramjam.zstd
        try:
            out.advance(library.decompress_into(data, out.room()))
        except cramjam.DecompressionError as exc:
            # The one way cramjam tells that the output buffer is full.
            if "failed to write whole buffer" in str(exc):
                raise BatchTooLarge(_too_large(cap)) from None
            raise
        return out.result()
    raise UnsupportedCodecError(f"unknown compression codec {codec}")


class _Output:
    """An anonymous mapping of ``prefix`` + ``capacity`` bytes: pages are only taken as
    they are written, so a large cap costs nothing until a batch fills it."""

    def __init__(self, prefix: bytes, capacity: int) -> None:
        self._buffer = mmap.mmap(-1, len(prefix) + capacity + SLACK)
        self._buffer[: len(prefix)] = prefix
        self._pos = len(prefix)
        self._end = len(prefix) + capacity
        self.capacity = capacity

    @property
    def free(self) -> int:
        return self._end - self._pos

    def room(self) -> memoryview:
        return memoryview(self._buffer)[self._pos : self._end]

    def advance(self, written: int) -> None:
        self._pos += written

    def write(self, chunk: bytes) -> None:
        if len(chunk) > self.free:
            raise BatchTooLarge(_too_large(self.capacity))
        self._buffer[self._pos : self._pos + len(chunk)] = chunk
        self._pos += len(chunk)

    def result(self) -> memoryview:
        return memoryview(self._buffer)[: self._pos]


def _too_large(cap: int) -> str:
    return f"records inflate past max_batch_decompressed_bytes ({cap} bytes)"


def _gunzip(data: memoryview, out: _Output) -> memoryview:
    """Every gzip member of ``data``, as ``gzip.decompress`` reads them (zero padding
    between members is skipped), fed and inflated ``_GZIP_STEP`` bytes at a time."""
    pending: Any = b""  # bytes, or a slice of ``data``
    member, pos = zlib.decompressobj(16 + zlib.MAX_WBITS), 0
    while True:
        if not pending and pos < len(data):
            pending, pos = data[pos : pos + _GZIP_STEP], pos + _GZIP_STEP
        before = len(pending)
        chunk = member.decompress(pending, min(_GZIP_STEP, out.free + 1))
        out.write(chunk)
        pending = member.unconsumed_tail
        if member.eof:
            rest = member.unused_data.lstrip(b"\x00")
            while not rest and pos < len(data):
                rest, pos = bytes(data[pos : pos + _GZIP_STEP]).lstrip(b"\x00"), pos + _GZIP_STEP
            if not rest:
                return out.result()
            member, pending = zlib.decompressobj(16 + zlib.MAX_WBITS), rest
        elif not chunk and len(pending) == before and (before or pos >= len(data)):
            raise CorruptRecordException("gzip data ends before its stream does")


def _unsnappy(data: memoryview, prefix: bytes, cap: int) -> memoryview:
    """Raw snappy or xerial's blocks of it; each block states its inflated size, so the
    total is checked against the cap before anything is inflated."""
    blocks = [data]
    if len(data) > len(_XERIAL_HEADER) and data[: len(_XERIAL_HEADER)] == _XERIAL_HEADER:
        blocks, pos = [], len(_XERIAL_HEADER)
        while pos < len(data):
            (size,) = struct.unpack_from(">i", data, pos)
            if size < 0 or pos + 4 + size > len(data):
                raise CorruptRecordException("a snappy block runs past the end of the batch")
            blocks.append(data[pos + 4 : pos + 4 + size])
            pos += 4 + size
    sizes = [cramjam.snappy.decompress_raw_len(block) for block in blocks]
    if sum(sizes) > cap:
        raise BatchTooLarge(_too_large(cap))
    out = _Output(prefix, sum(sizes))
    for block, size in zip(blocks, sizes, strict=True):
        if cramjam.snappy.decompress_raw_into(block, out.room()[:size]) != size:
            raise CorruptRecordException("a snappy block is shorter than it states")
        out.advance(size)
    return out.result()


def legacy_value(message: memoryview) -> memoryview:
    """The value of the v0/v1 ``message``: a compressed one's message set."""
    value = _legacy_message(message, 0, message[16])[4]
    if value is None:
        raise CorruptRecordException("a compressed message without a value")
    return memoryview(value)


def legacy_records(message: memoryview, inflated: memoryview | None) -> Iterator[WireRecord]:
    """The records of the v0/v1 ``message``: itself, or the message set ``inflated`` from
    its value. v1's inner offsets count from the set's first, so they are shifted to end
    at the outer message's offset; a log-append time is the outer message's."""
    magic = message[16]
    offset, attributes, outer_time, key, value, _ = _legacy_message(message, 0, magic)
    kind = None if magic == 0 else int(bool(attributes & _LOG_APPEND_TIME))
    if inflated is None:
        yield WireRecord(offset, outer_time, kind, key, value, [])
        return
    last, pos = 0, 0
    while pos < len(inflated):  # the last inner offset first: v1 offsets are relative to it
        if pos + 12 > len(inflated):
            raise CorruptRecordException("a message runs past the end of its set")
        last, size = _INT64.unpack_from(inflated, pos)[0], _INT32.unpack_from(inflated, pos + 8)[0]
        pos += 12 + max(size, 0)
    shift = offset - last if magic == 1 and offset >= last else 0
    pos = 0
    while pos < len(inflated):
        inner, attributes, timestamp, key, value, pos = _legacy_message(inflated, pos, magic)
        if attributes & _CODEC:
            raise CorruptRecordException("a message set compressed twice")
        yield WireRecord(inner + shift, outer_time if kind else timestamp, kind, key, value, [])


def _legacy_message(
    buffer: memoryview, pos: int, magic: int
) -> tuple[int, int, int | None, bytes | None, bytes | None, int]:
    """(offset, attributes, timestamp, key, value, end) of the v0/v1 message at ``pos``."""
    if pos + _LEGACY.size > len(buffer):
        raise CorruptRecordException("a message runs past the end of its set")
    offset, size, _, _, attributes = _LEGACY.unpack_from(buffer, pos)
    end, fields, timestamp = pos + 12 + size, pos + _LEGACY.size, None
    if end > len(buffer) or (magic == 1 and fields + 8 > end):
        raise CorruptRecordException("a message runs past the end of its set")
    if magic == 1:
        (timestamp,) = _INT64.unpack_from(buffer, fields)
        fields += 8
    key, fields = _sized(buffer, fields, end)
    value, fields = _sized(buffer, fields, end)
    if fields != end:
        raise CorruptRecordException(f"message size {size} does not match its fields")
    return offset, attributes, None if timestamp == -1 else timestamp, key, value, end


def _sized(buffer: memoryview, pos: int, end: int) -> tuple[bytes | None, int]:
    """An int32-sized field of a v0/v1 message (-1: null) that must end by ``end``."""
    size = _INT32.unpack_from(buffer, pos)[0] if pos + 4 <= end else -2
    if size < -1 or pos + 4 + max(size, 0) > end:
        raise CorruptRecordException("a field runs past the end of its message")
    if size < 0:
        return None, pos + 4
    return bytes(buffer[pos + 4 : pos + 4 + size]), pos + 4 + size
