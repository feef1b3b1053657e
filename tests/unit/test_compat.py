"""What ``streamer.kafka.compat`` relies on in aiokafka and cramjam, pinned against the
installed versions: an upgrade that changes any of it fails here first."""

from __future__ import annotations

import importlib.metadata
import inspect
import struct

import pytest
from aiokafka import AIOKafkaConsumer, codec
from aiokafka.consumer import fetcher
from aiokafka.consumer.group_coordinator import GroupCoordinator
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from aiokafka.record.legacy_records import LegacyRecordBatch, LegacyRecordBatchBuilder
from aiokafka.structs import TopicPartition
from hypothesis import given, settings
from hypothesis import strategies as st
from packaging.requirements import Requirement
from packaging.version import Version

from streamer.kafka import compat, wire

pytestmark = pytest.mark.timeout(60)

ENCODERS = {
    compat.GZIP: codec.gzip_encode,
    compat.SNAPPY: codec.snappy_encode,
    compat.LZ4: codec.lz4_encode,
    compat.ZSTD: codec.zstd_encode,
}
DECODERS = {
    compat.GZIP: codec.gzip_decode,
    compat.SNAPPY: codec.snappy_decode,
    compat.LZ4: codec.lz4_decode,
    compat.ZSTD: codec.zstd_decode,
}


def requirement(name: str) -> Requirement:
    for line in importlib.metadata.requires("streamer") or []:
        parsed = Requirement(line)
        if parsed.name == name and not parsed.marker:
            return parsed
    raise AssertionError(f"streamer does not depend on {name}")


def test_the_installed_aiokafka_is_one_the_package_allows() -> None:
    allowed = requirement("aiokafka").specifier
    assert Version(importlib.metadata.version("aiokafka")) in allowed
    assert set(allowed) == set(Requirement("aiokafka>=0.12,<0.15").specifier)


def test_every_codec_a_producer_may_use_is_installed_with_the_package() -> None:
    """Without aiokafka's extras lz4, snappy and zstd batches could not be read at all."""
    assert {"lz4", "snappy", "zstd"} <= requirement("aiokafka").extras
    assert requirement("cramjam").specifier.contains(importlib.metadata.version("cramjam"))
    assert codec.has_gzip() and codec.has_snappy() and codec.has_lz4() and codec.has_zstd()


def test_the_fetcher_builds_its_records_through_the_names_compat_replaces() -> None:
    source = inspect.getsource(fetcher.Fetcher)
    assert "MemoryRecords(part_data[-1])" in source
    assert "PartitionRecords(" in source
    parameters = list(inspect.signature(compat._STOCK_PARTITION_RECORDS).parameters)
    assert parameters[:4] == ["tp", "records", "aborted_transactions", "fetch_offset"]


def test_the_fetch_reader_is_told_where_each_fetch_starts() -> None:
    starts: list[int] = []

    class Records:
        def __init__(self, data: bytes) -> None:
            self.data = data

        def start_at(self, offset: int) -> None:
            starts.append(offset)

        def has_next(self) -> bool:
            return False

    try:
        compat.install_fetch_reader(Records)
        records = fetcher.MemoryRecords(b"response")
        partition = fetcher.PartitionRecords(
            TopicPartition("t", 0), records, [], 42, None, None, True, 0
        )
        assert records.data == b"response" and starts == [42]
        assert list(partition) == [] and partition.next_fetch_offset == 42
    finally:
        wire.install()


def test_the_stock_reader_reads_a_batch_from_a_memoryview_once() -> None:
    """The C reader takes any buffer, starts reading records at byte 61, and refuses a
    second iteration (which is why it is iterated once)."""
    builder = DefaultRecordBatchBuilder(2, 0, 0, -1, -1, -1, 1 << 20)
    for i in range(3):
        builder.append(i, 0, None, b"v%d" % i, [("h", b"x")])
    padded = bytes(builder.build()) + bytes(compat.SLACK)
    stock = compat.stock_batch(memoryview(padded)[: -compat.SLACK])
    records = iter(stock)
    assert next(records).value == b"v0"
    with pytest.raises(AssertionError):
        iter(stock)


async def test_group_state_and_fetch_position_read_the_consumer_s_state() -> None:
    consumer = AIOKafkaConsumer(bootstrap_servers="127.0.0.1:1", group_id="g")
    try:
        tp = TopicPartition("t", 0)
        assert compat.group_state(consumer) == (False, -1, False)
        consumer.assign([tp])
        assert compat.fetch_position(consumer, tp) is None
        consumer._subscription.subscription.assignment.state_value(tp).seek(5)
        assert compat.fetch_position(consumer, tp) == 5
        assert compat.fetch_position(consumer, TopicPartition("t", 1)) is None
    finally:
        await consumer.stop()
    init = inspect.getsource(GroupCoordinator.__init__)
    assert "self.coordinator_id = None" in init and "self.generation =" in init


@pytest.mark.parametrize("codec_id", list(ENCODERS))
def test_inflate_stops_at_the_cap_exactly(codec_id: int) -> None:
    data = bytes(range(256)) * 4096  # 1 MiB
    encoded = memoryview(ENCODERS[codec_id](data))
    assert bytes(compat.inflate(codec_id, encoded, len(data), b"head")) == b"head" + data
    with pytest.raises(compat.BatchTooLarge, match=f"\\({len(data) - 1} bytes\\)"):
        compat.inflate(codec_id, encoded, len(data) - 1)


@settings(max_examples=100, deadline=None)
@given(codec_id=st.sampled_from(list(ENCODERS)), data=st.binary(max_size=5000))
def test_inflate_reads_what_aiokafka_s_codecs_read(codec_id: int, data: bytes) -> None:
    """Byte for byte, and refusing what aiokafka refuses (xerial's header alone, for one)."""
    encoded = ENCODERS[codec_id](data)
    try:
        expected = DECODERS[codec_id](encoded)
    except Exception:
        with pytest.raises(Exception):  # noqa: B017 - whatever the codec raises
            compat.inflate(codec_id, memoryview(encoded), 1 << 20)
        return
    assert bytes(compat.inflate(codec_id, memoryview(encoded), 1 << 20)) == expected == data


def test_inflate_reads_raw_snappy_and_every_gzip_member() -> None:
    raw = struct.pack("B", 5) + b"\x10hello"  # snappy: length 5, one 5-byte literal
    assert bytes(compat.inflate(compat.SNAPPY, memoryview(raw), 100)) == b"hello"
    members = codec.gzip_encode(b"one") + b"\x00" * 3 + codec.gzip_encode(b"two")
    assert bytes(compat.inflate(compat.GZIP, memoryview(members), 100)) == b"onetwo"


@settings(max_examples=300, deadline=None)
@given(codec_id=st.sampled_from(list(ENCODERS)), data=st.binary(max_size=300))
def test_inflate_refuses_garbage_within_the_cap(codec_id: int, data: bytes) -> None:
    try:
        out = compat.inflate(codec_id, memoryview(data), 4096)
    except Exception:  # any error is the batch's: wire turns it into placeholders
        return
    assert len(out) <= 4096


@pytest.mark.parametrize(
    ("magic", "codec_id"),
    [(0, 0), (0, compat.GZIP), (0, compat.SNAPPY)]
    + [(1, c) for c in (0, compat.GZIP, compat.SNAPPY, compat.LZ4)],
)
def test_legacy_records_read_what_aiokafka_s_legacy_reader_reads(magic: int, codec_id: int) -> None:
    builder = LegacyRecordBatchBuilder(magic, codec_id, 1 << 20)
    count = 3 if codec_id else 1
    for i in range(count):
        offset = i if magic and codec_id else 10 + i
        builder.append(offset, 1_700_000_000_000 + i if magic else None, b"k%d" % i, b"v%d" % i)
    data = bytearray(builder.build())
    if codec_id:  # a broker gives the wrapper the set's last offset
        struct.pack_into(">q", data, 0, 10 + count - 1)
    expected = [
        (r.offset, r.timestamp, r.timestamp_type, r.key, r.value)
        for r in LegacyRecordBatch(bytes(data), magic)
    ]
    view = memoryview(bytes(data))
    inflated = None
    if codec_id:
        inflated = compat.inflate(codec_id, compat.legacy_value(view), 1 << 20, b"", magic)
    got = [
        (r.offset, r.timestamp, r.timestamp_type, r.key, r.value)
        for r in compat.legacy_records(view, inflated)
    ]
    assert got == expected
    assert [r[0] for r in got] == list(range(10, 10 + count))


def test_lz4_in_message_format_v0_is_refused_as_aiokafka_does() -> None:
    with pytest.raises(Exception, match="lz4"):
        compat.inflate(compat.LZ4, memoryview(codec.lz4_encode(b"x")), 100, b"", 0)
