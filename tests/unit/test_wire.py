"""Tolerant fetch-response reading, through aiokafka's own fetcher code (``PartitionRecords``)."""

from __future__ import annotations

import contextlib
import itertools
import struct
import subprocess
import sys
import time
import tracemalloc
import zlib
from pathlib import Path
from unittest import mock

import crc32c
import pytest
from aiokafka.consumer import fetcher
from aiokafka.errors import CorruptRecordException
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from aiokafka.record.legacy_records import LegacyRecordBatchBuilder
from aiokafka.record.memory_records import MemoryRecords
from aiokafka.structs import TopicPartition
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamer.errors import UndecodableRecord
from streamer.kafka import compat, wire
from streamer.kafka.records import dead_letter, metadata_error
from streamer.kafka.wire import UNREADABLE

pytestmark = pytest.mark.timeout(60)

TP = TopicPartition("in", 0)
CRC_OFFSET = 17  # base offset, length, leader epoch, magic
ATTRIBUTES_OFFSET = 21
LAST_OFFSET_DELTA = 23
RECORDS_OFFSET = 61  # the end of a v2 batch header
CODECS = {"none": 0, "gzip": 1, "snappy": 2, "lz4": 3, "zstd": 4}
LEGACY_CODECS = {0: ["none", "gzip", "snappy"], 1: ["none", "gzip", "snappy", "lz4"]}
CAP = 1 << 20


def batch(
    base_offset: int,
    records: list[tuple[bytes, list[tuple[str, bytes]]]],
    codec: str = "none",
) -> bytes:
    builder = DefaultRecordBatchBuilder(2, CODECS[codec], 0, -1, -1, -1, 1 << 30)
    for i, (value, headers) in enumerate(records):
        builder.append(i, 1_700_000_000_000 + i, b"key-%d" % i, value, headers)
    data = bytearray(builder.build())
    struct.pack_into(">q", data, 0, base_offset)
    return bytes(data)


def legacy(magic: int, base_offset: int, values: list[bytes], codec: str = "none") -> bytes:
    """A v0/v1 message set as a broker stores it: compressed, one wrapper whose offset is
    its last record's (v1 inner offsets relative, v0 absolute); else one message each."""
    timestamp = 1_700_000_000_000 if magic else None
    if codec == "none":
        parts = []
        for i, value in enumerate(values):
            builder = LegacyRecordBatchBuilder(magic, 0, 1 << 30)
            builder.append(base_offset + i, timestamp, b"k%d" % i, value)
            parts.append(bytes(builder.build()))
        return b"".join(parts)
    builder = LegacyRecordBatchBuilder(magic, CODECS[codec], 1 << 30)
    for i, value in enumerate(values):
        builder.append(i if magic else base_offset + i, timestamp, b"k%d" % i, value)
    data = bytearray(builder.build())
    struct.pack_into(">q", data, 0, base_offset + len(values) - 1)
    return bytes(data)


def fix_crc(data: bytearray | bytes, start: int = 0) -> bytes:
    fixed = bytearray(data)
    (length,) = struct.unpack_from(">i", fixed, start + 8)
    end = start + 12 + length
    if fixed[start + 16] == 2:
        struct.pack_into(">I", fixed, start + CRC_OFFSET, crc32c.crc32c(fixed[start + 21 : end]))
    else:
        struct.pack_into(">I", fixed, start + 12, zlib.crc32(fixed[start + 16 : end]))
    return bytes(fixed)


def with_header_name(data: bytes, old: bytes, new: bytes) -> bytes:
    """Rewrite a header name in place and fix the checksum, as a producer that writes
    raw bytes would have sent it."""
    assert len(old) == len(new) and data.count(old) == 1
    return fix_crc(data.replace(old, new))


def transactional(base_offset: int, producer_id: int, payloads: list[bytes]) -> bytes:
    builder = DefaultRecordBatchBuilder(2, 0, 1, producer_id, 0, 0, 1 << 30)
    for i, value in enumerate(payloads):
        builder.append(i, 1_700_000_000_000, None, value, [])
    data = bytearray(builder.build())
    struct.pack_into(">q", data, 0, base_offset)
    return bytes(data)


def marker(
    base_offset: int, producer_id: int, commit: bool, key: bytes | str | None = "marker"
) -> bytes:
    """A transaction's control batch as the coordinator writes it (abort or commit);
    ``key`` replaces the marker's key, "none" leaves the batch without a record."""
    builder = DefaultRecordBatchBuilder(2, 0, 1, producer_id, 0, -1, 1 << 30)
    if key == "marker":
        key = struct.pack(">hh", 0, int(commit))
    if key != "none":
        assert not isinstance(key, str)
        builder.append(0, 1_700_000_000_000, key, struct.pack(">hi", 0, 0), [])
    data = bytearray(builder.build())
    struct.pack_into(">q", data, 0, base_offset)
    data[ATTRIBUTES_OFFSET + 1] |= 0x20
    return fix_crc(data)


def partition(
    data: bytes,
    fetch_offset: int = 0,
    cap: int = CAP,
    aborted: list[tuple[int, int]] | None = None,
) -> fetcher.PartitionRecords:
    """The fetcher's reading of one partition's fetch response, as installed
    (read_committed, as the service reads, when ``aborted`` transactions are given)."""
    wire.install(max_batch_decompressed_bytes=cap)
    records = fetcher.MemoryRecords(data)
    isolation = 0 if aborted is None else 1
    return fetcher.PartitionRecords(
        TP, records, aborted or [], fetch_offset, None, None, True, isolation
    )


def read(data: bytes, fetch_offset: int = 0, cap: int = CAP, limit: int = 100_000) -> list:
    return list(itertools.islice(partition(data, fetch_offset, cap), limit))


def unreadable(record) -> bool:
    return bool(record.headers) and record.headers[0][0] == UNREADABLE


def values(records: list) -> list:
    return [(r.offset, None if unreadable(r) else r.value) for r in records]


def test_a_header_name_that_is_not_utf8_fails_the_stock_reader() -> None:
    """The error comes out of aiokafka's fetch path, not ours (the C reader raises
    UnicodeDecodeError, the pure-Python one wraps it in CorruptRecordException)."""
    data = with_header_name(
        batch(0, [(b"a", []), (b"b", [("NAME", b"x")])]), b"NAME", b"\xff\xfeAM"
    )
    stock = fetcher.PartitionRecords
    with pytest.raises((UnicodeDecodeError, CorruptRecordException)):
        list(stock(TP, MemoryRecords(data), [], 0, None, None, True, 0))


@pytest.mark.parametrize("codec", list(CODECS))
def test_a_header_name_that_is_not_utf8_is_read_with_its_bytes_kept(codec: str) -> None:
    good = batch(0, [(b"a", [("ce_id", b"1")])], codec)
    bad = batch(1, [(b"b", []), (b"c", [("NAME", b"x")]), (b"d", [])])
    bad = with_header_name(bad, b"NAME", b"\xff\xfeAM")
    records = read(good + bad)
    assert values(records) == [(0, b"a"), (1, b"b"), (2, b"c"), (3, b"d")]
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
    assert values(records) == [(0, b"a"), (1, None), (2, None), (3, b"d")]
    for placeholder in records[1:3]:
        [(name, message)] = placeholder.headers
        assert name == UNREADABLE and b"checksum mismatch" in message
        assert isinstance(metadata_error(placeholder), UndecodableRecord)
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


def test_install_replaces_the_classes_aiokafka_reads_fetches_with() -> None:
    wire.install(max_batch_decompressed_bytes=123_456)
    records = fetcher.MemoryRecords(batch(0, [(b"a", [])]))
    assert isinstance(records, wire.TolerantRecords) and records._cap == 123_456
    assert issubclass(fetcher.PartitionRecords, compat._STOCK_PARTITION_RECORDS)


def test_install_without_a_cap_keeps_the_one_set_before() -> None:
    """The tools install without one; in the service's process, its cap stays."""
    wire.install(max_batch_decompressed_bytes=123_456)
    wire.install()
    assert fetcher.MemoryRecords(b"")._cap == 123_456
    wire.install(max_batch_decompressed_bytes=CAP)
    assert fetcher.MemoryRecords(b"")._cap == CAP


def test_a_malformed_record_with_a_valid_checksum_becomes_a_placeholder() -> None:
    """A producer can write any bytes and a matching CRC: the record's own fields lie."""
    bad = bytearray(batch(0, [(b"a", [])]))
    assert bad[-1] == 0  # the record's header count (zig-zag varint 0)
    bad[-1] = 2  # claims one header that is not there
    records = read(fix_crc(bad) + batch(1, [(b"b", [])]))
    assert values(records) == [(0, None), (1, b"b")]


@settings(max_examples=200, deadline=None)
@given(
    payloads=st.lists(st.binary(max_size=300), min_size=1, max_size=5),
    flip=st.one_of(
        st.none(),
        st.integers(min_value=CRC_OFFSET, max_value=ATTRIBUTES_OFFSET - 1),
        st.integers(min_value=RECORDS_OFFSET),
    ),
)
def test_the_checksum_check_agrees_with_aiokafka_s_on_any_batch(
    payloads: list[bytes], flip: int | None
) -> None:
    """Data batches are checked with the crc32c package, not aiokafka's code: for any
    batch, intact or with one byte changed (the checksum itself included), both must
    accept or refuse it alike."""
    data = bytearray(batch(0, [(value, [("h", value[:3])]) for value in payloads]))
    if flip is not None and flip >= RECORDS_OFFSET:  # somewhere in the records
        data[RECORDS_OFFSET + (flip - RECORDS_OFFSET) % (len(data) - RECORDS_OFFSET)] ^= 0x01
    elif flip is not None:  # in the checksum itself
        data[flip] ^= 0x01
    expected = MemoryRecords(bytes(data)).next_batch().validate_crc()
    records = read(bytes(data))
    assert any(unreadable(r) for r in records) == (not expected)
    if expected:
        assert [r.value for r in records] == payloads


@pytest.mark.parametrize("codec", ["none", "gzip"])
@pytest.mark.parametrize("bad_index", [0, 63, 64, 133])
def test_a_bad_header_name_anywhere_in_a_batch_keeps_every_record(
    bad_index: int, codec: str
) -> None:
    count = 192
    records = [(b"v%d" % i, [("NAME", b"x")] if i == bad_index else []) for i in range(count)]
    data = batch(0, records)
    data = with_header_name(data, b"NAME", b"\xff\xfeAM")
    if codec == "gzip":  # the same records, compressed after the name was rewritten
        header, gz = bytearray(data[:RECORDS_OFFSET]), zlib.compressobj(wbits=31)
        body = gz.compress(data[RECORDS_OFFSET:]) + gz.flush()
        struct.pack_into(">h", header, ATTRIBUTES_OFFSET, CODECS[codec])
        struct.pack_into(">i", header, 8, len(header) + len(body) - 12)
        data = fix_crc(bytes(header) + body)
    read_back = read(data)
    assert values(read_back) == [(i, b"v%d" % i) for i in range(count)]
    assert metadata_error(read_back[bad_index]) is not None
    assert all(metadata_error(r) is None for i, r in enumerate(read_back) if i != bad_index)


def test_a_batch_of_many_records_is_not_read_all_at_once() -> None:
    """A compressed batch can hold millions of tiny records: reading its first one
    must not build them all."""
    data = batch(0, [(b"", []) for _ in range(20_000)])
    records = partition(data)
    tracemalloc.start()
    try:
        first = next(records)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert first.offset == 0
    assert peak < 3 * len(data) + 100_000, f"{peak} bytes to read one record of {len(data)}"


# Every codec a producer may use is read, in every message format a broker may serve.


@pytest.mark.parametrize("codec", list(CODECS))
def test_every_codec_s_batch_is_read(codec: str) -> None:
    photos = [bytes(range(256)) * 40 + b"%d" % i for i in range(5)]
    data = batch(7, [(p, [("ce_id", b"%d" % i)]) for i, p in enumerate(photos)], codec)
    data += batch(12, [(b"after", [])])
    records = read(data, fetch_offset=7)
    assert values(records) == [(7 + i, p) for i, p in enumerate(photos)] + [(12, b"after")]
    assert [r.key for r in records[:5]] == [b"key-%d" % i for i in range(5)]


@pytest.mark.parametrize(
    ("magic", "codec"), [(m, c) for m, codecs in LEGACY_CODECS.items() for c in codecs]
)
def test_every_legacy_message_set_is_read_once(magic: int, codec: str) -> None:
    """aiokafka's legacy reader restarts on every iter(), so reading it a chunk at a time
    never ended; offsets of a compressed v1 set count from its wrapper's."""
    data = legacy(magic, 10, [b"a", b"b", b"c"], codec) + legacy(magic, 13, [b"d"])
    records = read(data, fetch_offset=11)
    assert values(records) == [(11, b"b"), (12, b"c"), (13, b"d")]
    assert all(r.headers == () for r in records)
    assert records[0].key == b"k1"
    assert records[0].timestamp == (1_700_000_000_000 if magic else None)


@pytest.mark.parametrize("codec", ["gzip", "snappy", "lz4"])
def test_a_legacy_set_with_a_bad_checksum_becomes_placeholders(codec: str) -> None:
    corrupt = bytearray(legacy(1, 0, [b"a", b"b"], codec))
    corrupt[-1] ^= 0xFF
    records = read(bytes(corrupt) + legacy(1, 2, [b"c"]))
    assert values(records) == [(0, None), (1, None), (2, b"c")]
    assert records[0].timestamp == -1


# Offsets of what cannot be read come from verified data only.


def test_a_corrupt_last_offset_delta_does_not_decide_the_placeholders() -> None:
    corrupt = bytearray(batch(1, [(b"b", []), (b"c", []), (b"d", [])]))
    struct.pack_into(">i", corrupt, LAST_OFFSET_DELTA, 100_000)  # the CRC no longer matches
    data = batch(0, [(b"a", [])]) + bytes(corrupt) + batch(4, [(b"e", [])])
    assert values(read(data)) == [(0, b"a"), (1, None), (2, None), (3, None), (4, b"e")]


@pytest.mark.parametrize(
    "mutation",
    [
        pytest.param((16, 1), id="magic-1"),
        pytest.param((16, 0xFF), id="magic-255"),
        pytest.param((22, 0x20), id="control-bit"),
        pytest.param((22, 0x17), id="unknown-codec"),
        pytest.param((8, 0xFF), id="length"),
    ],
)
def test_a_corrupt_batch_header_never_escapes_getmany(mutation: tuple[int, int]) -> None:
    position, byte = mutation
    corrupt = bytearray(batch(1, [(b"b", []), (b"c", [])]))
    corrupt[position] = byte
    data = batch(0, [(b"a", [])]) + bytes(corrupt) + batch(3, [(b"d", [])])
    records = read(data)
    assert values(records)[0] == (0, b"a")
    assert [r.offset for r in records] == sorted({r.offset for r in records})
    assert all(unreadable(r) for r in records[1:] if r.value != b"d")


def serve(log: list[tuple[int, bytes]], position: int, max_batches: int) -> bytes:
    """What a broker answers a fetch at ``position``: the batch holding it, and those
    after it up to ``max_batches`` (``log``: each batch's first offset and bytes)."""
    first = max(i for i, (start, _) in enumerate(log) if start <= position)
    return b"".join(raw for _, raw in log[first : first + max_batches])


def consume(log: list[tuple[int, bytes]], max_batches: int, fetches: int = 20) -> list:
    """Fetch from 0 as aiokafka's fetcher does, until the log ends or ``fetches`` run out."""
    position, out = 0, []
    end = log[-1][0] + 1
    for _ in range(fetches):
        records = partition(serve(log, position, max_batches), fetch_offset=position)
        out += list(records)
        position = records.next_fetch_offset
        if position >= end:
            break
    return out


@pytest.mark.parametrize("max_batches", [1, 3])
@pytest.mark.parametrize("header_byte", [(16, 1), (8, 0xFF), (LAST_OFFSET_DELTA + 3, 0)])
def test_an_unreadable_batch_is_passed_and_never_served_forever(
    max_batches: int, header_byte: tuple[int, int]
) -> None:
    """A batch whose header cannot be believed (a magic byte or length outside the CRC,
    a last offset delta that fails it), alone in a response: the fetch moves on one
    offset at a time; with the next batch in the same response, in one step."""
    corrupt = bytearray(batch(3, [(b"x", []), (b"y", []), (b"z", [])]))
    corrupt[header_byte[0]] = header_byte[1]
    log = [(0, batch(0, [(b"a", []), (b"b", []), (b"c", [])])), (3, bytes(corrupt))]
    log += [(6, batch(6, [(b"g", [])])), (7, batch(7, [(b"h", [])]))]
    records = consume(log, max_batches)
    assert values(records) == [
        (0, b"a"), (1, b"b"), (2, b"c"), (3, None), (4, None), (5, None), (6, b"g"), (7, b"h"),
    ]  # fmt: skip


def test_read_committed_skips_aborted_transactions_and_their_markers() -> None:
    data = transactional(0, 7, [b"aborted-0", b"aborted-1"]) + marker(2, 7, commit=False)
    data += transactional(3, 8, [b"kept"]) + marker(4, 8, commit=True)
    records = partition(data, aborted=[(7, 0)])
    assert values(list(records)) == [(3, b"kept")]
    assert records.next_fetch_offset == 5


@pytest.mark.parametrize("key", [b"", b"\x00\x00", None, "none"])
def test_a_control_batch_without_a_control_record_never_escapes(key: bytes | str | None) -> None:
    """aiokafka parses a control batch's first key as a marker (4 bytes): a batch that
    claims to be one without it is dead-lettered, not raised."""
    data = batch(0, [(b"a", [])]) + marker(1, 7, True, key) + batch(2, [(b"c", [])])
    stock = fetcher.PartitionRecords
    with pytest.raises(Exception):  # noqa: B017 - aiokafka's fetcher raises what it meets
        list(stock(TP, MemoryRecords(data), [], 0, None, None, True, 1))
    assert values(list(partition(data, aborted=[]))) == [(0, b"a"), (1, None), (2, b"c")]


# Decompression is bounded.


@pytest.mark.parametrize("codec", [c for c in CODECS if c != "none"])
def test_a_batch_that_inflates_past_the_cap_becomes_placeholders(codec: str) -> None:
    bomb = batch(0, [(bytes(400_000), []) for _ in range(3)], codec)
    assert len(bomb) < 200_000
    fits = batch(3, [(bytes(400_000), []) for _ in range(2)], codec)
    records = read(bomb + fits, cap=CAP)
    fitting = [(3, bytes(400_000)), (4, bytes(400_000))]
    assert values(records) == [(0, None), (1, None), (2, None), *fitting]
    message = records[0].headers[0][1].decode()
    assert f"max_batch_decompressed_bytes ({CAP} bytes)" in message
    assert records[0].value == bomb, "the raw batch is kept for a replay with a larger cap"


@pytest.mark.parametrize("codec", ["gzip", "snappy", "lz4", "zstd"])
def test_a_decompression_bomb_costs_no_more_memory_than_the_cap(codec: str, tmp_path: Path) -> None:
    """Peak RSS of a process reading 40 MB of zeros compressed in one batch, with a cap of
    8 MB (measured in a child process: its high-water mark is its own)."""
    path = tmp_path / "bomb"
    path.write_bytes(batch(0, [(bytes(1 << 20), []) for _ in range(40)], codec))
    script = f"""
import resource
from aiokafka.consumer import fetcher
from aiokafka.structs import TopicPartition
from streamer.kafka import wire
wire.install(max_batch_decompressed_bytes={8 << 20})
data = open({str(path)!r}, "rb").read()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
records = fetcher.PartitionRecords(
    TopicPartition("t", 0), fetcher.MemoryRecords(data), [], 0, None, None, True, 0
)
count = sum(1 for r in records if r.headers and r.headers[0][0] == wire.UNREADABLE)
print(count, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=50, check=True
    )
    count, grown_kib = map(int, out.stdout.split())
    assert count == 40, "every offset of the bomb is a placeholder"
    assert grown_kib < 16 * 1024, f"{grown_kib} KiB to refuse an 8 MiB-capped bomb"


def test_a_compressed_batch_is_inflated_once_and_read_one_record_at_a_time() -> None:
    """aiokafka's C batch asserts on a second iter(): reading a compressed batch a chunk
    at a time inflated it again and built every record at once."""
    data = batch(0, [(b"%040d" % i, [("ce_id", b"%d" % i)]) for i in range(20_000)], "gzip")
    inflate = mock.Mock(wraps=compat.inflate)
    records = partition(data, cap=wire.DEFAULT_MAX_INFLATED_BYTES)
    with mock.patch.object(compat, "inflate", inflate):
        tracemalloc.start()
        try:
            chunks = iter(lambda: list(itertools.islice(records, 500)), [])  # as getmany
            read_back = sum(sum(not unreadable(r) for r in chunk) for chunk in chunks)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert read_back == 20_000
    assert inflate.call_count == 1
    assert peak < 1_000_000, f"{peak} bytes traced to read 20,000 records 500 at a time"


# The general rule, on generated input.


def _allowed_end(data: bytes, fetch_offset: int) -> int:
    """The offset that no record read from ``data`` may reach (checksums checked apart
    from the code under test): one past the fetch offset or the end a verified batch
    claims, whichever is higher; past them, one unverified batch stands for one offset."""
    end, pos = fetch_offset, 0
    while pos + 12 <= len(data):
        (base,) = struct.unpack_from(">q", data, pos)
        (length,) = struct.unpack_from(">i", data, pos + 8)
        frame = data[pos : pos + 12 + length]
        if length < 0 or len(frame) < 12 + length:
            break
        if len(frame) >= 61 and frame[16] == 2:
            (crc,) = struct.unpack_from(">I", frame, 17)
            if crc32c.crc32c(frame[21:]) == crc:
                end = max(end, base + struct.unpack_from(">i", frame, 23)[0] + 1)
        elif len(frame) >= 26 and frame[16] in (0, 1) and _legacy_crc_ok(frame):
            end = max(end, base + 1)
        pos += 12 + length
    return end + 1


def _legacy_crc_ok(frame: bytes) -> bool:
    return zlib.crc32(frame[16:]) == struct.unpack_from(">I", frame, 12)[0]


@st.composite
def fetch_responses(draw: st.DrawFn) -> tuple[bytes, int]:
    parts, offset = [], 0
    for _ in range(draw(st.integers(1, 4))):
        magic = draw(st.sampled_from([0, 1, 2, 2, 2]))
        codec = draw(st.sampled_from(list(CODECS) if magic == 2 else LEGACY_CODECS[magic]))
        payloads = draw(st.lists(st.binary(max_size=64), min_size=1, max_size=4))
        if draw(st.booleans()):  # a small bomb against a 4 KiB cap
            payloads = [bytes(3000)] * 2
        if magic == 2:
            raw = batch(offset, [(p, [("h", p[:2])]) for p in payloads], codec)
        else:
            raw = legacy(magic, offset, payloads, codec)
        parts.append(bytearray(raw))
        offset += len(payloads)
    for _ in range(draw(st.integers(0, 4))):
        target = draw(st.integers(0, len(parts) - 1))
        part = parts[target]
        if not part:
            continue
        where = draw(st.one_of(st.integers(0, 64), st.integers(0, len(part) - 1)))
        where = min(where, len(part) - 1)
        kind = draw(st.sampled_from(["byte", "int32", "truncate", "repeat", "insert"]))
        if kind == "byte":
            part[where] = draw(st.integers(0, 255))
        elif kind == "int32" and where + 4 <= len(part):
            value = draw(st.one_of(st.integers(-(2**31), 2**31 - 1), st.integers(-2, 100)))
            struct.pack_into(">i", part, where, value)
        elif kind == "truncate":
            del part[where:]
        elif kind == "repeat":
            parts.insert(target + 1, bytearray(part))
        else:
            part[where:where] = draw(st.binary(min_size=1, max_size=16))
        if draw(st.booleans()) and len(part) >= 26:
            # A producer that writes any bytes and a matching checksum.
            with contextlib.suppress(struct.error, IndexError):
                parts[target] = bytearray(fix_crc(part))
    return b"".join(parts), draw(st.integers(0, offset))


@st.composite
def transactions(draw: st.DrawFn) -> tuple[bytes, list[tuple[int, int]]]:
    """Transactional batches and their markers, some aborted, with header mutations."""
    parts, aborted, offset = [], [], 0
    for producer in range(draw(st.integers(1, 3))):
        count = draw(st.integers(1, 3))
        parts.append(bytearray(transactional(offset, producer, [b"v"] * count)))
        commit = draw(st.booleans())
        if not commit:
            aborted.append((producer, offset))
        parts.append(bytearray(marker(offset + count, producer, commit)))
        offset += count + 1
    for _ in range(draw(st.integers(0, 3))):
        part = draw(st.sampled_from(parts))
        part[draw(st.integers(0, min(RECORDS_OFFSET + 8, len(part) - 1)))] = draw(
            st.integers(0, 255)
        )
        if draw(st.booleans()):
            part[:] = fix_crc(part)
    return b"".join(parts), aborted


@settings(max_examples=400, deadline=5000, suppress_health_check=[HealthCheck.too_slow])
@given(response=fetch_responses())
def test_any_fetch_response_reads_in_order_within_verified_offsets_and_the_cap(
    response: tuple[bytes, int],
) -> None:
    data, fetch_offset = response
    cap = 4096
    inflated: list[int] = []

    def counted(*args, **kwargs):
        result = compat.inflate(*args, **kwargs)
        inflated.append(len(result) - len(args[3] if len(args) > 3 else b""))
        return result

    started = time.monotonic()
    with mock.patch.object(compat, "inflate", counted):
        records = partition(data, fetch_offset, cap)
        offsets = [r.offset for r in itertools.islice(records, 10_000)]
    assert time.monotonic() - started < 2
    assert offsets == sorted(set(offsets)), "strictly increasing"
    assert all(o >= fetch_offset for o in offsets)
    assert all(o < _allowed_end(data, fetch_offset) for o in offsets)
    assert records.next_fetch_offset >= max(offsets, default=fetch_offset - 1) + 1
    assert all(size <= cap for size in inflated)


@settings(max_examples=200, deadline=5000)
@given(response=transactions())
def test_any_transactional_response_reads_committed_records_in_order(
    response: tuple[bytes, list[tuple[int, int]]],
) -> None:
    data, aborted = response
    records = partition(data, aborted=aborted)
    offsets = [r.offset for r in itertools.islice(records, 1000)]
    assert offsets == sorted(set(offsets))
    assert all(o < _allowed_end(data, 0) for o in offsets)
