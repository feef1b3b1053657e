"""``streamer create-topics``: create the input, output and dead-letter topics if missing."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from streamer.tools.common import add_connection_flags, client_options, connected, tool_settings
from streamer.tools.errors import one_line_errors


def add_parser(commands: Any) -> None:
    parser = commands.add_parser("create-topics", help="create the service's topics if missing")
    add_connection_flags(parser)
    parser.add_argument(
        "topics",
        nargs="*",
        help="topic names (default: the configured input, output and DLQ topics)",
    )
    parser.add_argument("--partitions", type=int, default=3)
    parser.add_argument("--replication-factor", type=int, default=1)
    parser.set_defaults(func=_main)


async def create_topics(
    options: dict[str, Any],
    names: list[str],
    partitions: int,
    replication_factor: int = 1,
    max_message_bytes: int | None = None,
) -> list[str]:
    """Create each missing topic; return those that were created.

    ``max_message_bytes`` sets the topics' ``max.message.bytes`` (None: the broker's).
    """
    async with connected(AIOKafkaAdminClient(**options), options["bootstrap_servers"]) as admin:
        existing = set(await admin.list_topics())
        missing = [n for n in names if n not in existing]
        configs = {"max.message.bytes": str(max_message_bytes)} if max_message_bytes else {}
        if missing:
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(
                    [
                        NewTopic(n, partitions, replication_factor, topic_configs=configs)
                        for n in missing
                    ]
                )
        return missing


async def delete_topics_with_prefix(options: dict[str, Any], prefix: str) -> list[str]:
    """Delete every topic whose name starts with ``prefix``; return their names."""
    if not prefix:
        raise ValueError("an empty prefix would delete every topic")
    async with connected(AIOKafkaAdminClient(**options), options["bootstrap_servers"]) as admin:
        names = sorted(n for n in await admin.list_topics() if n.startswith(prefix))
        if names:
            await admin.delete_topics(names)
        return names


@one_line_errors("create-topics")
def _main(args: argparse.Namespace) -> int:
    s = tool_settings(args)
    names = args.topics or [s.input_topic, s.output_topic, s.dlq_topic]
    created = asyncio.run(
        create_topics(
            client_options(args),
            names,
            args.partitions,
            args.replication_factor,
            # Room for an image at the service's limit, as a dead letter with its headers.
            max_message_bytes=s.max_message_bytes,
        )
    )
    for name in names:
        print(f"{name}: {'created' if name in created else 'exists'}")
    return 0
