"""``streamer consume``: read predictions (or dead letters) as JSON lines or a table.

Reads from the beginning of the topic without joining a group or committing.
Stops after ``-n`` records, or at the end of the topic unless ``--follow``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import AsyncIterator
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRecord

from streamer.kafka import wire
from streamer.tools.common import add_connection_flags, client_options, tool_settings


def add_parser(commands: Any) -> None:
    parser = commands.add_parser("consume", help="print predictions from the output topic")
    add_connection_flags(parser)
    parser.add_argument("--topic", default=None, help="default: the configured output topic")
    parser.add_argument("-n", "--max-records", type=int, default=None, help="stop after N records")
    parser.add_argument("--follow", action="store_true", help="keep waiting for new records")
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


async def read_records(
    options: dict[str, Any],
    topic: str,
    max_records: int | None = None,
    follow: bool = False,
    timeout_s: float = 60.0,
    isolation_level: str = "read_committed",
) -> AsyncIterator[ConsumerRecord[bytes, bytes]]:
    wire.install()  # a record with undecodable headers must not end the read
    consumer = AIOKafkaConsumer(
        topic,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level=isolation_level,
        **options,
    )
    await consumer.start()
    try:
        partitions = consumer.assignment()
        while not partitions:
            await asyncio.sleep(0.05)
            partitions = consumer.assignment()
        end = await consumer.end_offsets(list(partitions))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        seen = 0
        while max_records is None or seen < max_records:
            batches = await consumer.getmany(timeout_ms=200)
            for records in batches.values():
                for record in records:
                    yield record
                    seen += 1
                    if max_records is not None and seen >= max_records:
                        return
            if follow:
                continue
            if max_records is None:
                positions = {tp: await consumer.position(tp) for tp in partitions}
                if all(positions[tp] >= end[tp] for tp in partitions):
                    return
            elif loop.time() > deadline:
                raise TimeoutError(f"only {seen} of {max_records} records within {timeout_s} s")
    finally:
        await consumer.stop()


def format_table_row(record: ConsumerRecord[bytes, bytes]) -> str:
    try:
        prediction = json.loads(record.value or b"")
        top = prediction["top_k"]
        best = ", ".join(f"{t['label']} {t['score']:.3f}" for t in top[:3])
        return f"{prediction['id'][:36]:<36}  {prediction['batch_size']:>5}  {best}"
    except (ValueError, KeyError, TypeError):
        headers = dict(record.headers or ())
        reason = headers.get("streamer-error-reason", b"?").decode(errors="replace")
        source = f"{record.topic}/{record.partition}/{record.offset}"
        return f"{source:<36}  {'-':>5}  dead letter: {reason}"


async def _consume(args: argparse.Namespace) -> int:
    topic = args.topic or tool_settings(args).output_topic
    if args.format == "table":
        print(f"{'id or source':<36}  {'batch':>5}  top-3 (or dead-letter reason)")
    async for record in read_records(
        client_options(args), topic, args.max_records, args.follow, args.timeout_s, args.isolation
    ):
        if args.format == "json":
            value = (record.value or b"").decode(errors="replace")
            try:
                print(json.dumps(json.loads(value)))
            except ValueError:
                print(
                    json.dumps(
                        {
                            "topic": record.topic,
                            "partition": record.partition,
                            "offset": record.offset,
                            "headers": {
                                k: v.decode(errors="replace") for k, v in record.headers or ()
                            },
                        }
                    )
                )
        else:
            print(format_table_row(record))
        sys.stdout.flush()
    return 0


def _main(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_consume(args))
    except TimeoutError as exc:
        print(f"streamer consume: {exc}", file=sys.stderr)
        return 1
