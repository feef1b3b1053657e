"""Reading fetch responses so that no bytes in them can make a fetch fail, stall or blow up.

aiokafka parses fetched batches inside ``getmany()``: a header name that is not UTF-8
(kcat writes any bytes and the broker does not check), a batch that fails its
checksum, a message-format v0/v1 batch, a decompression bomb would each raise there,
loop forever or exhaust memory. ``install()`` makes its fetcher read every fetch
response with ``TolerantRecords`` instead (through ``streamer.kafka.compat``, the one
module that touches aiokafka's internals). For any bytes of a response:

1. Reading ends and never raises. A batch is framed by its length field; a response
   whose first batch cannot be framed stands for the fetch position alone.
2. A batch is *verified* when its checksum matches (v2: CRC-32C from the attributes on;
   v0/v1: CRC-32 from the magic byte on); only then is the offset range its header
   claims believed. An unverified batch stands for the offsets from the fetch position
   up to the first offset of the verified batch after it in the same response, or,
   when there is none, for the position alone, and the rest of the response is left to
   the next fetch, which then starts one offset further on.
3. Offsets come out strictly increasing and inside the range above; the batch's
   ``next_offset`` never goes back, so the fetch always moves on.
4. A compressed batch inflates into at most ``max_batch_decompressed_bytes``.
5. What cannot be read becomes placeholders, one record per offset it stands for,
   carrying the reason in the ``UNREADABLE`` header (the first one also carries the raw
   batch as its value); ``streamer.kafka.records.metadata_error`` turns them into
   ``undecodable-record`` dead letters. Header names aiokafka cannot decode are read
   with ``surrogateescape``: ``name.encode("utf-8", "surrogateescape")`` gives the bytes.

A v2 batch is read by aiokafka's reader (C speed), iterated once; only a batch that
reader rejects is read again, once, here, from the same inflated bytes. v0/v1 message
sets are read here only: aiokafka's legacy reader restarts on every ``iter()``.
Checksums use the ``crc32c`` package (the CPU's CRC-32C instruction where it has one):
over 34 KB images aiokafka's table-driven code took a tenth of the event loop's time.
"""

from __future__ import annotations

import itertools
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import crc32c
from aiokafka.errors import CorruptRecordException, KafkaError

from streamer.kafka import compat
from streamer.kafka.compat import WireRecord

# A header name no fetched record can have: decoding bytes never yields a lone high
# surrogate (surrogateescape only makes U+DC80..U+DCFF), so no producer can forge it.
UNREADABLE = "\ud800streamer-unreadable-batch"
DEFAULT_MAX_INFLATED_BYTES = 64 * 1024 * 1024

# base offset, length, leader epoch, magic, crc, attributes, last offset delta, first and
# max timestamp, producer id and epoch, base sequence, record count
_V2 = struct.Struct(">qiibIhiqqqhii")
_LEGACY_CRC = struct.Struct(">I")  # at byte 12 of a v0/v1 message, over the rest from 16
_INT32, _INT64 = struct.Struct(">i"), struct.Struct(">q")
_LOG_OVERHEAD = 12  # base offset + length: what frames a batch
_CODEC, _LOG_APPEND_TIME, _TRANSACTIONAL, _CONTROL = 0x07, 0x08, 0x10, 0x20
_PAD = bytes(compat.SLACK)
_MESSAGE_LIMIT = 1000  # characters of an error kept in a placeholder


_cap = DEFAULT_MAX_INFLATED_BYTES  # what ``install`` was last given


def install(max_batch_decompressed_bytes: int | None = None) -> None:
    """Make every aiokafka consumer in this process read fetch responses tolerantly.

    The fetcher's class is one per process, and so is the cap: a call without one (a
    tool reading a topic beside the service) keeps the cap an earlier call set."""
    global _cap
    if max_batch_decompressed_bytes is not None:
        _cap = max_batch_decompressed_bytes
    compat.install_fetch_reader(partial(TolerantRecords, max_inflated_bytes=_cap))


@dataclass(frozen=True)
class _Frame:
    """One batch's bytes and what its header says; ``problem`` None when verified."""

    view: memoryview
    magic: int
    problem: str | None
    base: int  # v2: the first offset; v0/v1: the message's (a compressed set's last)
    end: int  # the offset after the last one the header claims
    attributes: int = 0
    first_timestamp: int = -1
    max_timestamp: int = -1
    producer_id: int | None = None
    count: int = 0

    @property
    def lowest(self) -> int | None:
        """The lowest offset the batch can hold, where verified data says so."""
        if self.problem is not None or (self.magic < 2 and self.attributes & _CODEC):
            return None
        return self.base


def _inspect(view: memoryview) -> _Frame:
    (base,) = _INT64.unpack_from(view)
    magic = view[16] if len(view) > 16 else -1
    if magic == 2 and len(view) >= _V2.size:
        fields = _V2.unpack_from(view)
        crc, attributes, last_delta, first, latest, producer, count = fields[4:10] + fields[12:]
        ok = crc32c.crc32c(view[21:]) == crc
        return _Frame(
            view, 2, None if ok else "checksum mismatch", base, base + last_delta + 1,
            attributes, first, latest, producer, count,
        )  # fmt: skip
    if magic in (0, 1) and len(view) >= _LOG_OVERHEAD + (14 if magic == 0 else 22):
        (crc,), attributes = _LEGACY_CRC.unpack_from(view, 12), view[17]
        timestamp = _INT64.unpack_from(view, 18)[0] if magic == 1 else -1
        ok = zlib.crc32(view[16:]) == crc
        problem = None if ok else "checksum mismatch"
        return _Frame(view, magic, problem, base, base + 1, attributes, timestamp, timestamp)
    return _Frame(view, magic, f"no batch header of magic {magic} fits its length", base, base)


class TolerantRecords:
    """The batches of one fetch response; the interface of aiokafka's ``MemoryRecords``."""

    def __init__(self, data: bytes, max_inflated_bytes: int = DEFAULT_MAX_INFLATED_BYTES) -> None:
        self._size = len(data)
        # One copy with zero bytes after it: aiokafka's C reader may read a varint a few
        # bytes past the end of a malformed batch.
        self._data = memoryview(b"".join((data, _PAD)))[: self._size]
        self._cap = max_inflated_bytes
        self._pos = 0
        self._position: int | None = None  # the next offset the consumer wants
        self._frames: dict[int, _Frame | None] = {}
        self._stopped = False

    def start_at(self, offset: int) -> None:
        """The offset this fetch started at (``compat`` says so before any reading)."""
        self._position = offset

    def size_in_bytes(self) -> int:
        return self._size

    def _frame(self, start: int) -> _Frame | None:
        """The complete batch at ``start``, or None when the rest is a partial batch."""
        if start not in self._frames:
            frame = None
            if self._size - start >= _LOG_OVERHEAD:
                (length,) = _INT32.unpack_from(self._data, start + 8)
                end = start + _LOG_OVERHEAD + length
                if length >= 0 and end <= self._size:
                    frame = _inspect(self._data[start:end])
            if frame is None and start == 0 and self._size:
                # A broker always sends the first batch whole: this length is corrupt.
                (base,) = _INT64.unpack_from(self._data) if self._size >= 8 else (-1,)
                frame = _Frame(self._data, -1, "a batch that cannot be framed", base, base)
            self._frames[start] = frame
        return self._frames[start]

    def has_next(self) -> bool:
        return not self._stopped and self._frame(self._pos) is not None

    def next_batch(self) -> TolerantBatch | None:
        frame = None if self._stopped else self._frame(self._pos)
        if frame is None:
            return None
        del self._frames[self._pos]
        self._pos += len(frame.view)
        position = frame.base if self._position is None else self._position
        bound = None
        if frame.problem is not None:
            following = self._frame(self._pos)
            bound = None if following is None else following.lowest
        batch = TolerantBatch(frame, position, bound, self._cap)
        self._position = batch.next_offset
        self._stopped = batch.stops_fetch
        return batch


class TolerantBatch:
    """One batch, as aiokafka's fetcher reads it: the flags it checks, then its records."""

    def __init__(self, frame: _Frame, position: int, bound: int | None, cap: int) -> None:
        self._frame, self._cap = frame, cap
        v2 = frame.problem is None and frame.magic == 2
        self.base_offset = frame.base if frame.problem is None else position
        self.is_control_batch = v2 and bool(frame.attributes & _CONTROL)
        self.is_transactional = v2 and bool(frame.attributes & _TRANSACTIONAL)
        self.producer_id = frame.producer_id if v2 else None
        self.stops_fetch = False
        if frame.problem is None:
            end = frame.end
        elif bound is not None:
            end = bound  # what lies before the next verified batch, if anything does
        else:
            end, self.stops_fetch = position + 1, True
        self._start, self._end = position, end
        self.next_offset = max(end, position)
        self._iterator: Iterator[Any] | None = None
        if self.is_control_batch:
            self._check_control()

    def validate_crc(self) -> bool:
        return True  # a batch that fails its checksum is read as placeholders instead

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        if self._iterator is None:
            self._iterator = self._records()
        return next(self._iterator)

    def _check_control(self) -> None:
        """aiokafka parses a control batch's first key as a marker: a batch without one
        is read as an unreadable data batch."""
        records = self._records()
        first = next(records, None)
        key = None if first is None or _is_placeholder(first) else first.key
        if key is not None and len(key) >= 4:
            self._iterator = itertools.chain([first], records)
            return
        self.is_control_batch = self.is_transactional = False
        self.producer_id = None
        problem = CorruptRecordException("a control batch without a control record")
        self._iterator = self._placeholders(self._start, problem)

    def _records(self) -> Iterator[Any]:
        frame = self._frame
        if frame.problem is not None:
            yield from self._placeholders(self._start, CorruptRecordException(frame.problem))
            return
        try:
            content = self._content()
        except Exception as exc:  # a codec error, a bomb: any bytes a producer wrote
            yield from self._placeholders(self._start, exc)
            return
        if frame.magic < 2:
            inflated = content if frame.attributes & _CODEC else None
            readers: tuple[Iterator[Any], ...] = (compat.legacy_records(frame.view, inflated),)
        else:
            readers = (_stock_records(content), _v2_records(frame, content))
        last, given, error = None, 0, Exception()
        for reader in readers:  # the next one only where the one before failed
            try:
                for record in itertools.islice(reader, given, None):
                    if record.offset >= self._end or (last is not None and record.offset <= last):
                        raise CorruptRecordException(f"record offset {record.offset} out of order")
                    last, given = record.offset, given + 1
                    yield record
                return
            except Exception as exc:  # any bytes a producer wrote, even with a valid CRC
                error = exc
        yield from self._placeholders(self._start if last is None else last + 1, error)

    def _content(self) -> memoryview:
        """The batch with its records inflated: v2 keeps its header (codec bits cleared,
        for aiokafka's reader); v0/v1 is the inner message set (or the message itself)."""
        frame, codec = self._frame, self._frame.attributes & _CODEC
        if not codec:
            return frame.view
        if frame.magic < 2:
            value = compat.legacy_value(frame.view)
            return compat.inflate(codec, value, self._cap, b"", frame.magic)
        header = bytearray(frame.view[: _V2.size])
        struct.pack_into(">h", header, 21, frame.attributes & ~_CODEC)
        return compat.inflate(codec, frame.view[_V2.size :], self._cap, bytes(header))

    def _placeholders(self, first: int, error: BaseException) -> Iterator[WireRecord]:
        first = max(first, self._start)
        text = str(error) if isinstance(error, KafkaError) else f"{type(error).__name__}: {error}"
        message = f"unreadable record batch at offsets {first}-{self._end - 1}: {text}"
        header = [(UNREADABLE, message[:_MESSAGE_LIMIT].encode())]
        timestamp = self._frame.first_timestamp if self._frame.problem is None else -1
        raw: bytes | None = bytes(self._frame.view)
        for offset in range(first, self._end):
            yield WireRecord(offset, timestamp, 0, None, raw, list(header))
            raw = None


def _is_placeholder(record: Any) -> bool:
    return bool(record.headers) and record.headers[0][0] == UNREADABLE


def _stock_records(content: memoryview) -> Iterator[Any]:
    yield from compat.stock_batch(content)  # built in here, so its errors come out of next()


def _v2_records(frame: _Frame, buffer: memoryview) -> Iterator[WireRecord]:
    """The records of a v2 batch, header names decoded with ``surrogateescape``.

    Kafka's DefaultRecord: length, attributes, timestamp delta, offset delta, key, value,
    then the headers as (name, value) pairs; sizes are zig-zag varints, -1 means null.
    """
    log_append = bool(frame.attributes & _LOG_APPEND_TIME)
    pos = _V2.size
    for _ in range(frame.count):
        length, pos = _varint(buffer, pos)
        end = pos + length
        _, pos = _varint(buffer, pos)  # attributes: unused
        timestamp_delta, pos = _varint(buffer, pos)
        offset_delta, pos = _varint(buffer, pos)
        key, pos = _field(buffer, pos)
        value, pos = _field(buffer, pos)
        count, pos = _varint(buffer, pos)
        headers: list[tuple[str, bytes | None]] = []
        for _ in range(count):  # each pair takes 2 bytes at least: bounded by the batch
            name, pos = _field(buffer, pos)
            header_value, pos = _field(buffer, pos)
            headers.append(((name or b"").decode("utf-8", "surrogateescape"), header_value))
        if pos != end:
            raise CorruptRecordException(f"record length {length} does not match its fields")
        timestamp = frame.max_timestamp if log_append else frame.first_timestamp + timestamp_delta
        yield WireRecord(frame.base + offset_delta, timestamp, int(log_append), key, value, headers)


def _varint(buffer: memoryview, pos: int) -> tuple[int, int]:
    """The zig-zag varint at ``pos`` (10 bytes at most) and the position after it."""
    value = shift = 0
    while pos < len(buffer) and shift < 70:
        byte = buffer[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return (value >> 1) ^ -(value & 1), pos
        shift += 7
    raise CorruptRecordException("a varint runs past the end of the batch or 10 bytes")


def _field(buffer: memoryview, pos: int) -> tuple[bytes | None, int]:
    size, pos = _varint(buffer, pos)
    if size < 0:
        return None, pos
    if pos + size > len(buffer):
        raise CorruptRecordException("a field runs past the end of the batch")
    return bytes(buffer[pos : pos + size]), pos + size
