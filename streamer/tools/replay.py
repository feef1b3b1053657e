"""``streamer replay``: re-publish dead letters to the input topic once their cause is fixed.

Each run reads the dead-letter topic from where the previous run of the same
replay group stopped up to its end at the start of the run, and re-publishes the
records that match the filters (``--reason``, ``--since``/``--until`` on the
original record's timestamp) with their original value, key and headers; the
``streamer-error-*``/``streamer-source-*`` headers are replaced by
``streamer-replayed-from: <dlq topic>/<partition>/<offset>``.

Nothing is lost or duplicated: the re-published records and the replay group's
dead-letter offsets are committed in one Kafka transaction, so a crash mid-run
replays the uncommitted part again and never repeats a committed one. Records
that do not match the filters are passed over and the group moves past them;
replay them later with another ``--replay-group`` (or ``--from-beginning``).
Because of that, an unknown ``--reason`` (a typo would match nothing and move
the group past every dead letter) is refused before any offset is touched.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord
from aiokafka.structs import OffsetAndMetadata, TopicPartition

from streamer import errors
from streamer.kafka import wire
from streamer.schemas import (
    DLQ_REASON,
    DLQ_SOURCE_TIMESTAMP,
    OWN_HEADER_PREFIX,
    Headers,
    header,
    unescape_input_header,
)
from streamer.tools.common import (
    add_connection_flags,
    client_options,
    connected,
    require_topic,
    tool_settings,
)
from streamer.tools.errors import UsageError, one_line_errors

REPLAYED_FROM = "streamer-replayed-from"
TRANSACTION_RECORDS = 500


@dataclass(frozen=True)
class ReplayFilter:
    reasons: frozenset[str] = frozenset()
    since_ms: int | None = None
    until_ms: int | None = None

    def matches(self, record: ConsumerRecord[bytes, bytes]) -> bool:
        reason = (header(record.headers, DLQ_REASON) or b"").decode(errors="replace")
        if self.reasons and reason not in self.reasons:
            return False
        raw = header(record.headers, DLQ_SOURCE_TIMESTAMP)
        timestamp = int(raw) if raw and raw.isdigit() else record.timestamp
        if self.since_ms is not None and timestamp < self.since_ms:
            return False
        return not (self.until_ms is not None and timestamp >= self.until_ms)


@dataclass
class ReplayReport:
    read: int = 0
    replayed: int = 0


def replay_headers(record: ConsumerRecord[bytes, bytes]) -> Headers:
    """The input's headers as its producer wrote them, and where the replay came from.

    The service's own headers are left out; input headers it renamed because they looked
    like its own are named back (``unescape_input_header``).
    """
    kept = [
        (unescape_input_header(k), v)
        for k, v in record.headers or ()
        if not k.startswith(OWN_HEADER_PREFIX)
    ]
    kept = [(k, v) for k, v in kept if k != REPLAYED_FROM]
    origin = f"{record.topic}/{record.partition}/{record.offset}".encode()
    return [*kept, (REPLAYED_FROM, origin)]


async def replay(
    options: dict[str, Any],
    dlq_topic: str,
    input_topic: str,
    group: str,
    filters: ReplayFilter,
    from_beginning: bool = False,
) -> ReplayReport:
    wire.install()  # a record with undecodable headers must not end the read
    consumer = AIOKafkaConsumer(
        group_id=group,
        enable_auto_commit=False,
        isolation_level="read_committed",
        auto_offset_reset="earliest",
        **options,
    )
    report = ReplayReport()
    async with contextlib.AsyncExitStack() as clients:  # stopped in reverse: producer first
        await clients.enter_async_context(connected(consumer, options["bootstrap_servers"]))
        require_topic(await consumer.topics(), dlq_topic)
        # Made only now: a producer that is never started still warns "Unclosed".
        producer = AIOKafkaProducer(
            transactional_id=f"{group}-{dlq_topic}",
            acks="all",
            enable_idempotence=True,
            max_request_size=64 * 1024 * 1024,
            **options,
        )
        await clients.enter_async_context(connected(producer, options["bootstrap_servers"]))
        known = await producer.partitions_for(dlq_topic)  # waits for the topic's metadata
        partitions = [TopicPartition(dlq_topic, p) for p in sorted(known)]
        consumer.assign(partitions)
        if from_beginning:
            await consumer.seek_to_beginning(*partitions)
        end = await consumer.end_offsets(partitions)
        while True:
            remaining = [tp for tp in partitions if await consumer.position(tp) < end[tp]]
            if not remaining:
                return report
            batch = await consumer.getmany(
                *remaining, timeout_ms=1000, max_records=TRANSACTION_RECORDS
            )
            async with producer.transaction():
                offsets: dict[TopicPartition, OffsetAndMetadata] = {}
                for tp, records in batch.items():
                    for record in records:
                        if record.offset >= end[tp]:
                            break  # arrived after the run started: the next run's work
                        report.read += 1
                        offsets[tp] = OffsetAndMetadata(record.offset + 1, "")
                        if filters.matches(record):
                            await producer.send(
                                input_topic,
                                record.value,
                                key=record.key,
                                headers=replay_headers(record),
                            )
                            report.replayed += 1
                if offsets:
                    await producer.send_offsets_to_transaction(offsets, group)


def add_parser(commands: Any) -> None:
    parser = commands.add_parser("replay", help="re-publish dead letters to the input topic")
    add_connection_flags(parser)
    parser.add_argument(
        "--reason",
        action="append",
        default=[],
        help="only this streamer-error-reason (repeatable; default: all)",
    )
    parser.add_argument(
        "--since",
        type=_timestamp_ms,
        default=None,
        help="only records whose original timestamp is at or after (ISO 8601)",
    )
    parser.add_argument(
        "--until",
        type=_timestamp_ms,
        default=None,
        help="only records whose original timestamp is before (ISO 8601)",
    )
    parser.add_argument(
        "--replay-group",
        default=None,
        help="consumer group remembering what was replayed (default: <group_id>.replay)",
    )
    parser.add_argument(
        "--from-beginning",
        action="store_true",
        help="start at the beginning of the dead-letter topic",
    )
    parser.set_defaults(func=_main)


def _timestamp_ms(text: str) -> int:
    return int(datetime.fromisoformat(text).timestamp() * 1000)


def check_reasons(reasons: list[str]) -> None:
    """UsageError for a reason no dead letter carries (``streamer.errors.DEAD_LETTER_REASONS``,
    read at each call: the list grows with the service)."""
    valid = errors.DEAD_LETTER_REASONS
    if unknown := [r for r in reasons if r not in valid]:
        raise UsageError(
            f"unknown --reason {', '.join(map(repr, unknown))}; valid reasons: {', '.join(valid)}"
        )


@one_line_errors("replay")
def _main(args: argparse.Namespace) -> int:
    check_reasons(args.reason)  # before any client exists: a typo must not move the group
    s = tool_settings(args)
    group = args.replay_group or f"{s.group_id}.replay"
    filters = ReplayFilter(frozenset(args.reason), args.since, args.until)
    options = client_options(args) | {"client_id": f"streamer-replay-{os.getpid()}"}
    report = asyncio.run(
        replay(options, s.dlq_topic, s.input_topic, group, filters, args.from_beginning)
    )
    print(
        f"read {report.read} dead letters from {s.dlq_topic}, "
        f"replayed {report.replayed} to {s.input_topic}",
        file=sys.stdout,
    )
    return 0
