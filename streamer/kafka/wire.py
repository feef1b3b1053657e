"""Reading fetched record batches so that no bytes in a record can make a fetch fail.

aiokafka parses fetched batches inside ``getmany()``. A header name that is not valid
UTF-8 (the protocol says header names are UTF-8 strings, but kcat or librdkafka write
any bytes and the broker does not check) raises ``UnicodeDecodeError`` there: it ends
the caller's loop, and every record behind it waits forever. A batch that fails its
checksum raises ``CorruptRecordException`` the same way, on every fetch again.

``install()`` swaps the one class aiokafka's fetcher reads fetch responses with
(``aiokafka.consumer.fetcher.MemoryRecords``) for ``TolerantRecords``. Batches are still
read by aiokafka's own (C or Python) reader; only a batch that reader rejects is read
again here:

1. header names are decoded with ``surrogateescape``: nothing is lost, as
   ``name.encode("utf-8", "surrogateescape")`` gives the bytes back;
2. a batch that cannot be read at all becomes one placeholder record per offset it
   covers, carrying the error in the ``UNREADABLE`` header (the first one also carries
   the batch's raw bytes as its value), so that every offset is dead-lettered and the
   consumer moves past it.

Data batches' checksums are checked here, with the ``crc32c`` package (the CPU's
CRC-32C instruction where it has one), not with aiokafka's table-driven code: over
34 KB images that was a tenth of the event loop's time, where the instruction takes
a fourteenth of it.

``streamer.kafka.records.metadata_error`` turns both into ``undecodable-record`` dead
letters. A record that aiokafka reads without complaint never takes the slow path.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import aiokafka.consumer.fetcher as fetcher
import crc32c
from aiokafka.errors import CorruptRecordException
from aiokafka.record.default_records import _DefaultRecordBatchPy
from aiokafka.record.memory_records import MemoryRecords
from aiokafka.record.util import decode_varint

# A header name no fetched record can have: decoding bytes never yields a lone high
# surrogate (surrogateescape only makes U+DC80..U+DCFF), so no producer can forge it.
UNREADABLE = "\ud800streamer-unreadable-batch"

_LOG_OVERHEAD = 12  # base offset (int64) + batch length (int32)
_MAGIC_OFFSET = 16  # then the leader epoch (int32)
_CRC_OFFSET = 17  # then the magic byte
_ATTRIBUTES_OFFSET = 21  # the checksum covers the rest of the batch from here
_CHUNK = 64  # records read from a clean batch at a time


@dataclass(frozen=True)
class WireRecord:
    """One record as aiokafka's fetcher reads it (the attributes it uses)."""

    offset: int
    timestamp: int
    timestamp_type: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes | None]]
    checksum: None = None


def install() -> None:
    """Make every aiokafka consumer in this process read batches tolerantly (idempotent)."""
    fetcher.MemoryRecords = TolerantRecords  # type: ignore[misc,assignment]


class TolerantRecords:
    """The batches of one fetch response; the interface of aiokafka's ``MemoryRecords``."""

    def __init__(self, data: bytes) -> None:
        self._data = memoryview(data)
        self._pos = 0

    def size_in_bytes(self) -> int:
        return len(self._data)

    def _next_end(self) -> int | None:
        """Where the next complete batch ends; None when the rest is a partial batch."""
        remaining = len(self._data) - self._pos
        if remaining < _LOG_OVERHEAD:
            return None
        (length,) = struct.unpack_from(">i", self._data, self._pos + 8)
        end = self._pos + _LOG_OVERHEAD + length
        return end if length >= 0 and end <= len(self._data) else None

    def has_next(self) -> bool:
        return self._next_end() is not None

    def next_batch(self) -> TolerantBatch | None:
        end = self._next_end()
        if end is None:
            return None
        raw, self._pos = self._data[self._pos : end], end
        return TolerantBatch(raw)


class TolerantBatch:
    """One batch: aiokafka's reader first, ``_read_tolerantly`` when it fails.

    A 34 KB image is usually a batch of its own, so what aiokafka's fetcher reads of
    every batch is a plain attribute here, and the records of a batch that reads
    cleanly are read ``_CHUNK`` at a time (C speed with aiokafka's C reader, and
    memory bounded however many records a compressed batch holds); from a chunk
    that fails on, the batch is read record by record (``__next__``).
    """

    def __init__(self, raw: memoryview) -> None:
        self._raw = raw
        self._inner: Any = None
        self._error: Exception | None = None
        try:
            self._inner = MemoryRecords(bytes(raw)).next_batch()
        except (CorruptRecordException, ValueError, IndexError, struct.error) as exc:
            self._error = exc
        (self.base_offset,) = struct.unpack_from(">q", raw)
        if self._inner is None:  # the header itself is unreadable: a data batch
            self.is_control_batch = self.is_transactional = False
            self.producer_id = None
            self.next_offset = self.base_offset + 1
        else:
            self.is_control_batch = bool(self._inner.is_control_batch)
            self.is_transactional = bool(self._inner.is_transactional)
            self.producer_id = self._inner.producer_id
            self.next_offset = int(self._inner.next_offset)
        self._checksum_ok = True
        self._next_offset = 0  # every record below this one was yielded
        self._rest: Iterator[WireRecord] | None = None

    def __getattr__(self, name: str) -> Any:
        return None if self._inner is None else getattr(self._inner, name)

    def validate_crc(self) -> bool:
        """Control batches keep aiokafka's check; data batches are checked here instead."""
        if self._inner is None:
            return True
        if self.is_control_batch:
            return bool(self._inner.validate_crc())
        self._checksum_ok = self._crc_matches()
        return True

    def _crc_matches(self) -> bool:
        if self._raw[_MAGIC_OFFSET] < 2:  # a legacy batch: its own checksum layout
            return bool(self._inner.validate_crc())
        (stored,) = struct.unpack_from(">I", self._raw, _CRC_OFFSET)
        return bool(crc32c.crc32c(self._raw[_ATTRIBUTES_OFFSET:]) == stored)

    def __iter__(self) -> Iterator[Any]:
        if self._inner is None or not self._checksum_ok:
            return self  # placeholders
        return itertools.chain.from_iterable(self._chunks())

    def _chunks(self) -> Iterator[Iterable[Any]]:
        while True:
            try:
                chunk = list(itertools.islice(self._inner, _CHUNK))
            except Exception:  # any bytes a producer wrote, even with a valid CRC
                # Read it again record by record: the records before the bad one as
                # aiokafka reads them (the fetcher skips those it already has), the
                # rest tolerantly.
                self._inner = MemoryRecords(bytes(self._raw)).next_batch()
                yield self._one_by_one()
                return
            if not chunk:
                return
            yield chunk

    def _one_by_one(self) -> Iterator[Any]:
        while True:
            try:
                yield self.__next__()
            except StopIteration:
                return

    def __next__(self) -> Any:
        if self._rest is None:
            if self._inner is not None and self._checksum_ok:
                try:
                    record = next(self._inner)
                except StopIteration:
                    raise
                except Exception as exc:  # any bytes a producer wrote, even with a valid CRC
                    self._rest = self._read_again(exc)
                else:
                    self._next_offset = record.offset + 1
                    return record
            else:
                error = self._error or CorruptRecordException("checksum mismatch")
                self._rest = self._placeholders(error)
        return next(self._rest)

    def _read_again(self, error: Exception) -> Iterator[WireRecord]:
        try:
            records = _read_tolerantly(self._raw)
        except Exception:  # the batch is broken, not just a header name
            records = list(self._placeholders(error))
        return (r for r in records if r.offset >= self._next_offset)

    def _placeholders(self, error: Exception) -> Iterator[WireRecord]:
        message = f"unreadable record batch at offset {self.base_offset}: {error!r}".encode()
        timestamp = self.first_timestamp or -1
        for offset in range(max(self.base_offset, self._next_offset), self.next_offset):
            value = bytes(self._raw) if offset == self.base_offset else None
            yield WireRecord(offset, timestamp, 0, None, value, [(UNREADABLE, message)])


def _read_tolerantly(raw: memoryview) -> list[WireRecord]:
    """Every record of a v2 batch, header names decoded with ``surrogateescape``.

    The record layout (Kafka's DefaultRecord): length, attributes, timestamp delta,
    offset delta, key, value, then the headers as (name, value) pairs; sizes are
    zig-zag varints and -1 means null.
    """
    if raw[_MAGIC_OFFSET] < 2:
        raise CorruptRecordException("legacy batches are never re-read")
    batch = _DefaultRecordBatchPy(raw)
    batch._maybe_uncompress()  # a compressed batch's records start at 0 once inflated
    buffer, pos = batch._buffer, batch._pos
    records = []
    for _ in range(batch._num_records):
        length, pos = decode_varint(buffer, pos)
        end = pos + length
        _, pos = decode_varint(buffer, pos)  # attributes: unused
        timestamp_delta, pos = decode_varint(buffer, pos)
        offset_delta, pos = decode_varint(buffer, pos)
        key, pos = _read_bytes(buffer, pos)
        value, pos = _read_bytes(buffer, pos)
        count, pos = decode_varint(buffer, pos)
        headers: list[tuple[str, bytes | None]] = []
        for _ in range(count):
            name, pos = _read_bytes(buffer, pos)
            header_value, pos = _read_bytes(buffer, pos)
            headers.append(((name or b"").decode("utf-8", "surrogateescape"), header_value))
        if pos != end:
            raise CorruptRecordException(f"record length {length} does not match its fields")
        timestamp = (
            batch.max_timestamp
            if batch.timestamp_type == batch.LOG_APPEND_TIME
            else batch.first_timestamp + timestamp_delta
        )
        records.append(
            WireRecord(
                batch.base_offset + offset_delta,
                timestamp,
                batch.timestamp_type,
                key,
                value,
                headers,
            )
        )
    return records


def _read_bytes(buffer: bytearray, pos: int) -> tuple[bytes | None, int]:
    size, pos = decode_varint(buffer, pos)
    if size < 0:
        return None, pos
    if pos + size > len(buffer):
        raise CorruptRecordException("a field runs past the end of the batch")
    return bytes(buffer[pos : pos + size]), pos + size
