"""Tolerant batch reading, through aiokafka's own fetcher code (``PartitionRecords``)."""

from __future__ import annotations

import struct
import tracemalloc

import pytest
from aiokafka.consumer.fetcher import PartitionRecords
from aiokafka.errors import CorruptRecordException
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from aiokafka.record.memory_records import MemoryRecords
from aiokafka.record.util import calc_crc32c
from aiokafka.structs import TopicPartition
from hypothesis import given, settings
from hypothesis import strategies as st

from streamer.errors import UndecodableRecord
from streamer.kafka import wire
from streamer.kafka.records import dead_letter, metadata_error
from streamer.kafka.wire import UNREADABLE, TolerantRecords

pytestmark = pytest.mark.timeout(30)

TP = TopicPartition("in", 0)
CRC_OFFSET = 17  # base offset, length, leader epoch, magic
ATTRIBUTES_OFFSET = 21
RECORDS_OFFSET = 61  # the end of a v2 batch header


def batch(base_offset: int, records: list[tuple[bytes, list[tuple[str, bytes]]]]) -> bytes:
    builder = DefaultRecordBatchBuilder(2, 0, 0, -1, -1, -1, 1 << 20)
    for i, (value, headers) in enumerate(records):
        builder.append(i, 1_700_000_000_000 + i, b"key-%d" % i, value, headers)
    data = bytearray(builder.build())
    struct.pack_into(">q", data, 0, base_offset)
    return bytes(data)


def with_header_name(data: bytes, old: bytes, new: bytes) -> bytes:
    """Rewrite a header name in place and fix the checksum, as a producer that writes
    raw bytes would have sent it."""
    assert len(old) == len(new) and data.count(old) == 1
    fixed = bytearray(data.replace(old, new))
    struct.pack_into(">I", fixed, CRC_OFFSET, calc_crc32c(bytes(fixed[ATTRIBUTES_OFFSET:])))
    return bytes(fixed)


def read(data: bytes, records_class: type = TolerantRecords, fetch_offset: int = 0) -> list:
    partition = PartitionRecords(TP, records_class(data), [], fetch_offset, None, None, True, 0)
    return list(partition)


def test_a_header_name_that_is_not_utf8_fails_the_stock_reader() -> None:
    """Finding 1: the error comes out of aiokafka's fetch path, not ours (the C reader
    raises UnicodeDecodeError, the pure-Python one wraps it in CorruptRecordException)."""
    data = with_header_name(
        batch(0, [(b"a", []), (b"b", [("NAME", b"x")])]), b"NAME", b"\xff\xfeAM"
    )
    with pytest.raises((UnicodeDecodeError, CorruptRecordException)):
        read(data, MemoryRecords)


def test_a_header_name_that_is_not_utf8_is_read_with_its_bytes_kept() -> None:
    good = batch(0, [(b"a", [("ce_id", b"1")])])
    bad = batch(1, [(b"b", []), (b"c", [("NAME", b"x")]), (b"d", [])])
    bad = with_header_name(bad, b"NAME", b"\xff\xfeAM")
    records = read(good + bad)
    assert [(r.offset, r.value) for r in records] == [(0, b"a"), (1, b"b"), (2, b"c"), (3, b"d")]
    name, value = records[2].headers[0]
    assert name.encode("utf-8", "surrogateescape") == b"\xff\xfeAM" and value == b"x"
    assert records[2].key == b"key-1" and records[2].timestamp == 1_700_000_000_001
    error = metadata_error(records[2])
    assert isinstance(error, UndecodableRecord) and error.reason == "undecodable-record"
    assert metadata_error(records[3]) is None
    letter = dead_letter(records[2], error, "dlq")
    assert ("\\xff\\xfeAM", b"x") in letter.headers


def test_a_batch_with_a_bad_checksum_becomes_one_placeholder_per_offset() -> None:
    good = batch(0, [(b"a", [])])
    corrupt = bytearray(batch(1, [(b"b", []), (b"c", [])]))
    corrupt[-1] ^= 0xFF  # a flipped byte in the last record
    after = batch(3, [(b"d", [])])
    records = read(good + bytes(corrupt) + after)
    assert [r.offset for r in records] == [0, 1, 2, 3]
    assert records[0].value == b"a" and records[3].value == b"d"
    for placeholder in records[1:3]:
        [(name, message)] = placeholder.headers
        assert name == UNREADABLE and b"checksum mismatch" in message
        error = metadata_error(placeholder)
        assert isinstance(error, UndecodableRecord)
    assert records[1].value == bytes(corrupt), "the first placeholder keeps the raw batch"
    assert records[2].value is None


def test_a_partial_batch_at_the_end_of_a_fetch_is_left_for_the_next_fetch() -> None:
    data = batch(0, [(b"a", [])]) + batch(1, [(b"b", [])])[:-5]
    assert [r.value for r in read(data)] == [b"a"]


def test_records_below_the_fetch_offset_are_skipped_as_aiokafka_does() -> None:
    data = with_header_name(
        batch(0, [(b"a", []), (b"b", [("NAME", b"")]), (b"c", [])]), b"NAME", b"\xffNAM"
    )
    assert [r.value for r in read(data, fetch_offset=2)] == [b"c"]


def test_install_replaces_the_class_aiokafka_reads_fetches_with() -> None:
    import aiokafka.consumer.fetcher as fetcher

    wire.install()
    assert fetcher.MemoryRecords is TolerantRecords


def test_a_malformed_record_with_a_valid_checksum_becomes_a_placeholder() -> None:
    """A producer can write any bytes and a matching CRC: the record's own fields lie."""
    bad = bytearray(batch(0, [(b"a", [])]))
    assert bad[-1] == 0  # the record's header count (zig-zag varint 0)
    bad[-1] = 2  # claims one header that is not there
    struct.pack_into(">I", bad, CRC_OFFSET, calc_crc32c(bytes(bad[ATTRIBUTES_OFFSET:])))
    records = read(bytes(bad) + batch(1, [(b"b", [])]))
    assert [r.offset for r in records] == [0, 1] and records[1].value == b"b"
    assert records[0].headers[0][0] == UNREADABLE


@settings(max_examples=200, deadline=None)
@given(
    values=st.lists(st.binary(max_size=300), min_size=1, max_size=5),
    flip=st.one_of(
        st.none(),
        st.integers(min_value=CRC_OFFSET, max_value=ATTRIBUTES_OFFSET - 1),
        st.integers(min_value=RECORDS_OFFSET),
    ),
)
def test_the_checksum_check_agrees_with_aiokafka_s_on_any_batch(
    values: list[bytes], flip: int | None
) -> None:
    """Data batches are checked with the crc32c package, not aiokafka's code: for any
    batch, intact or with one byte changed (the checksum itself included), both
    must accept or refuse it alike. (Bytes changed in the batch header's other fields
    would change which offsets the placeholders stand for, not the verdict.)"""
    data = bytearray(batch(0, [(value, [("h", value[:3])]) for value in values]))
    if flip is not None and flip >= RECORDS_OFFSET:  # somewhere in the records
        data[RECORDS_OFFSET + (flip - RECORDS_OFFSET) % (len(data) - RECORDS_OFFSET)] ^= 0x01
    elif flip is not None:  # in the checksum itself
        data[flip] ^= 0x01
    expected = MemoryRecords(bytes(data)).next_batch().validate_crc()
    records = read(bytes(data))
    refused = any(r.headers and r.headers[0][0] == UNREADABLE for r in records)
    assert refused == (not expected)
    if expected:
        assert [r.value for r in records] == values


@pytest.mark.parametrize("bad_index", [0, wire._CHUNK - 1, wire._CHUNK, 2 * wire._CHUNK + 5])
def test_a_bad_header_name_in_a_later_chunk_keeps_every_record(bad_index: int) -> None:
    count = 3 * wire._CHUNK
    records = [(b"v%d" % i, [("NAME", b"x")] if i == bad_index else []) for i in range(count)]
    data = with_header_name(batch(0, records), b"NAME", b"\xff\xfeAM")
    read_back = read(data)
    assert [(r.offset, r.value) for r in read_back] == [(i, b"v%d" % i) for i in range(count)]
    assert metadata_error(read_back[bad_index]) is not None
    assert all(metadata_error(r) is None for i, r in enumerate(read_back) if i != bad_index)


def test_a_batch_of_many_records_is_not_read_all_at_once() -> None:
    """A compressed batch can hold millions of tiny records: reading its first one
    must not build them all (finding of the final review: an eager read did)."""
    data = batch(0, [(b"", []) for _ in range(20_000)])
    partition = PartitionRecords(TP, TolerantRecords(data), [], 0, None, None, True, 0)
    tracemalloc.start()
    try:
        first = next(partition)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert first.offset == 0
    assert peak < 3 * len(data) + 100_000, (
        f"{peak} bytes to read one record of a {len(data)}-byte batch"
    )
