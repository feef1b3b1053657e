"""``streamer consume``: read predictions (or dead letters) as JSON lines or a table.

By default reads from the beginning of the topic without joining a group or
committing, and stops after ``-n`` records, or at the end of the topic unless
``--follow``. ``--from-end`` reads only records produced after the start (and
waits for them unless ``-n`` bounds the run). ``--group G`` joins consumer group
G and commits each record once it is printed, so the next run with the same
group continues after it.

The table shows, per record, the prediction id (or the dead letter's position),
the record key (``streamer produce`` sets it to the file name) and the top-3
labels, or the dead-letter reason. It reads only ``id`` and ``top_k`` of a
prediction: every other field is optional to it. The JSON format prints one
object per record: ``topic``, ``partition``, ``offset``, ``timestamp``,
``key``, ``headers`` and ``value`` (the prediction, or null when the value is
not JSON, as for a dead letter, whose size is then in ``value_bytes``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator
from typing import Any, TypeAlias

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, ConsumerRecord
from aiokafka.errors import KafkaError
from aiokafka.structs import TopicPartition

from streamer.kafka import wire
from streamer.schemas import DLQ_REASON, header
from streamer.tools.common import (
    add_connection_flags,
    client_options,
    connected,
    require_topic,
    tool_settings,
)
from streamer.tools.errors import one_line_errors

Record: TypeAlias = ConsumerRecord[bytes, bytes]
Offsets: TypeAlias = dict[TopicPartition, int]


def add_parser(commands: Any) -> None:
    parser = commands.add_parser("consume", help="print predictions from the output topic")
    add_connection_flags(parser)
    parser.add_argument("--topic", default=None, help="default: the configured output topic")
    parser.add_argument("-n", "--max-records", type=int, default=None, help="stop after N records")
    parser.add_argument("--follow", action="store_true", help="keep waiting for new records")
    parser.add_argument(
        "--from-end",
        action="store_true",
        help="only records produced after the start (waits for them unless -n is given)",
    )
    parser.add_argument(
        "--group",
        default=None,
        help="join this consumer group and commit what was printed: the next run continues",
    )
    parser.add_argument("--format", choices=("json", "table"), default="table")
    parser.add_argument(
        "--isolation",
        choices=("read_committed", "read_uncommitted"),
        default="read_committed",
        help="read_committed skips outputs of aborted or open transactions (exactly-once mode)",
    )
    parser.add_argument(
        "--timeout-s",
        type=float,
        default=60.0,
        help="with -n: give up after this long without reaching N",
    )
    parser.set_defaults(func=_main)


class _GroupListener(ConsumerRebalanceListener):  # type: ignore[misc]
    """Group mode: commits what was printed from a partition before it is taken away, and
    with ``from_end`` starts a partition seen for the first time at its end."""

    def __init__(self, consumer: AIOKafkaConsumer, done: Offsets, from_end: bool) -> None:
        self.consumer = consumer
        self.done = done
        self.from_end = from_end
        self.seen: set[TopicPartition] = set()

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        offsets = {tp: self.done.pop(tp) for tp in revoked if tp in self.done}
        if offsets:
            await self.consumer.commit(offsets)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        new = [tp for tp in assigned if tp not in self.seen]
        self.seen.update(new)
        if self.from_end and new:
            await self.consumer.seek_to_end(*new)
            # Committed even if nothing arrives: the next run starts here, not at
            # the beginning of a partition this run never read from.
            for tp in new:
                self.done[tp] = await self.consumer.position(tp)


async def read_records(
    options: dict[str, Any],
    topic: str,
    max_records: int | None = None,
    follow: bool = False,
    timeout_s: float = 60.0,
    isolation_level: str = "read_committed",
    *,
    group: str | None = None,
    from_end: bool = False,
    check_topic: bool = False,
) -> AsyncIterator[Record]:
    """Yield the records of ``topic``.

    Stops after ``max_records`` (TimeoutError when they do not come within
    ``timeout_s``), else at the end offsets of the partitions as first assigned,
    else (``follow``) never. Without ``group`` every partition is read and
    nothing is committed. With ``group``, a record is committed once the caller
    asks for the next one (or the generator ends): the caller is done with it.
    ``check_topic`` raises TopicMissing at once for an unknown topic.
    """
    wire.install()  # a record with undecodable headers must not end the read
    consumer = AIOKafkaConsumer(
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level=isolation_level,
        **options,
    )
    done: Offsets = {}  # per partition: the offset after the last record the caller took

    async def commit() -> None:
        if group is not None and done:
            offsets = dict(done)
            done.clear()  # cleared first: a failed commit is not retried on the way out
            await consumer.commit(offsets)

    async with connected(consumer, options["bootstrap_servers"]):
        if check_topic:
            require_topic(await consumer.topics(), topic)
        if group is None:
            consumer.subscribe([topic])
        else:
            consumer.subscribe([topic], listener=_GroupListener(consumer, done, from_end))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        partitions = await _assignment(consumer, topic, group, deadline)
        if group is None and from_end:
            await consumer.seek_to_end(*partitions)
        end: Offsets = {}
        seen = 0
        try:
            while max_records is None or seen < max_records:
                batches = await consumer.getmany(timeout_ms=200)
                for tp, records in batches.items():
                    for record in records:
                        yield record
                        done[tp] = record.offset + 1
                        seen += 1
                        if max_records is not None and seen >= max_records:
                            return
                await commit()
                if follow:
                    continue
                if max_records is None:
                    assigned = consumer.assignment()
                    if new := [tp for tp in assigned if tp not in end]:
                        end.update(await consumer.end_offsets(new))
                    positions = {tp: await consumer.position(tp) for tp in assigned}
                    if all(positions[tp] >= end[tp] for tp in assigned):
                        return
                elif loop.time() > deadline:
                    raise TimeoutError(
                        f"only {seen} of {max_records} records within {timeout_s:g} s"
                    )
        except BaseException:
            with contextlib.suppress(KafkaError):  # the error on its way out says more
                await commit()
            raise
        finally:
            await commit()


async def _assignment(
    consumer: AIOKafkaConsumer, topic: str, group: str | None, deadline: float
) -> set[TopicPartition]:
    """The first non-empty assignment; TimeoutError at ``deadline``."""
    loop = asyncio.get_running_loop()
    while not (partitions := consumer.assignment()):
        if loop.time() > deadline:
            where = f" to group {group!r}" if group else ""
            raise TimeoutError(f"no partition of {topic!r} was assigned{where} in time")
        await asyncio.sleep(0.05)
    return set(partitions)


def _text(data: bytes | None) -> str | None:
    return None if data is None else data.decode(errors="replace")


def format_table_header() -> str:
    return f"{'id or source':<36}  {'key':<24}  top-3 (or dead-letter reason)"


def format_table_row(record: Record) -> str:
    """id (or topic/partition/offset), key, then the top-3 labels or the dead-letter reason."""
    key = _text(record.key) or "-"
    try:
        prediction = json.loads(record.value or b"")
        best = ", ".join(f"{t['label']} {t['score']:.3f}" for t in prediction["top_k"][:3])
        return f"{str(prediction['id'])[:36]:<36}  {key[:24]:<24}  {best}"
    except (ValueError, KeyError, TypeError, AttributeError):
        reason = _text(header(record.headers, DLQ_REASON))
        source = f"{record.topic}/{record.partition}/{record.offset}"
        what = (
            f"dead letter: {reason}"
            if reason
            else f"not a prediction: {len(record.value or b'')} bytes"
        )
        return f"{source:<36}  {key[:24]:<24}  {what}"


def format_json(record: Record) -> str:
    """One JSON object: the record's coordinates, key, headers and (JSON) value."""
    try:
        value: Any = json.loads(record.value or b"")
    except ValueError:
        value = None
    document = {
        "topic": record.topic,
        "partition": record.partition,
        "offset": record.offset,
        "timestamp": record.timestamp,
        "key": _text(record.key),
        "headers": {name: _text(data) for name, data in record.headers or ()},
        "value": value,
    }
    if value is None:
        document["value_bytes"] = len(record.value or b"")
    return json.dumps(document)


async def _consume(args: argparse.Namespace) -> int:
    topic = args.topic or tool_settings(args).output_topic
    records = read_records(
        client_options(args),
        topic,
        args.max_records,
        follow=args.follow or (args.from_end and args.max_records is None),
        timeout_s=args.timeout_s,
        isolation_level=args.isolation,
        group=args.group,
        from_end=args.from_end,
        check_topic=True,
    )
    printed = 0
    async for record in records:
        if args.format == "json":
            print(format_json(record))
        else:
            if not printed:  # only once connected: a failed run prints one line, on stderr
                print(format_table_header())
            print(format_table_row(record))
        printed += 1
        sys.stdout.flush()
    if not printed:
        print(f"streamer consume: no records in {topic!r}", file=sys.stderr)
    return 0


@one_line_errors("consume")
def _main(args: argparse.Namespace) -> int:
    return asyncio.run(_consume(args))
