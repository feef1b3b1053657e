"""``streamer produce PATH...``: publish image files to the input topic.

Paths may be files, folders (every file inside, recursively) or glob patterns.
Each record's value is the file's bytes, its key the file name, and its headers
``content-type`` (from the extension), ``ce_id`` (a fresh UUID) and a W3C
``traceparent``.

Nothing is sent when a path does not exist, when the topic does not exist (the
local broker would otherwise create a misspelt one) or when a file is above
``--max-payload-bytes`` (the service would only dead-letter it).
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import glob
import mimetypes
import secrets
import sys
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import MessageSizeTooLargeError

from streamer.schemas import HEADER_CONTENT_TYPE, HEADER_ID, HEADER_TRACEPARENT, Headers
from streamer.tools.common import (
    add_connection_flags,
    client_options,
    connected,
    progress_bar,
    require_topic,
    tool_settings,
)
from streamer.tools.errors import MessageTooLarge, one_line_errors


def add_parser(commands: Any) -> None:
    parser = commands.add_parser("produce", help="publish image files to the input topic")
    add_connection_flags(parser)
    parser.add_argument("paths", nargs="+", help="files, folders or glob patterns")
    parser.add_argument("--topic", default=None, help="default: the configured input topic")
    parser.add_argument(
        "--max-payload-bytes",
        type=int,
        default=None,
        help="refuse files above this size (default: STREAMER_MAX_PAYLOAD_BYTES, 8 MiB)",
    )
    parser.add_argument(
        "--quiet", action="store_true", help="no progress bar (none either when not a terminal)"
    )
    parser.set_defaults(func=_main)


def expand(paths: Iterable[str]) -> list[Path]:
    files: list[Path] = []
    for pattern in paths:
        matches = glob.glob(pattern, recursive=True) or [pattern]
        for match in sorted(matches):
            path = Path(match)
            if path.is_dir():
                files.extend(sorted(p for p in path.rglob("*") if p.is_file()))
            elif path.is_file():
                files.append(path)
            else:
                raise FileNotFoundError(errno.ENOENT, "no such file or folder", match)
    return files


def image_headers(path: Path) -> Headers:
    content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    traceparent = f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"
    return [
        (HEADER_CONTENT_TYPE, content_type.encode()),
        (HEADER_ID, str(uuid.uuid4()).encode()),
        (HEADER_TRACEPARENT, traceparent.encode()),
    ]


Message = tuple[bytes | None, bytes, Headers]  # key, value, headers


async def publish(
    options: dict[str, Any],
    topic: str,
    messages: Iterable[Message],
    on_ack: Callable[[int], None] | None = None,
    *,
    check_topic: bool = False,
) -> int:
    """Send every message with an idempotent acks=all producer; return once all are acked.

    ``check_topic``: raise TopicMissing before sending when ``topic`` does not exist.
    A message the broker refuses as too large raises MessageTooLarge.
    """
    producer = AIOKafkaProducer(
        acks="all",
        enable_idempotence=True,
        linger_ms=5,
        max_request_size=64 * 1024 * 1024,
        **options,
    )
    pending: list[tuple[bytes | None, int, asyncio.Future[Any]]] = []
    try:
        async with connected(producer, options["bootstrap_servers"]):
            if check_topic:
                require_topic((await producer.client.fetch_all_metadata()).topics(), topic)
            for key, value, headers in messages:
                try:
                    future = await producer.send(topic, value, key=key, headers=headers)
                except MessageSizeTooLargeError as exc:  # above max_request_size
                    raise MessageTooLarge(topic, key, len(value)) from exc
                pending.append((key, len(value), future))
            for acked, (key, size, future) in enumerate(pending, start=1):
                try:
                    await future
                except MessageSizeTooLargeError as exc:  # refused by the broker
                    raise MessageTooLarge(topic, key, size) from exc
                if on_ack is not None:
                    on_ack(acked)
    finally:
        # After a failure the rest were still settled by stop(); their errors are
        # covered by the one raised, and must not be logged as "never retrieved".
        for *_, future in pending:
            if future.done() and not future.cancelled():
                future.exception()
    return len(pending)


async def produce_files(
    options: dict[str, Any],
    topic: str,
    files: list[Path],
    progress: bool = True,
    check_topic: bool = False,
) -> int:
    """Publish ``files``, keyed by file name; a progress bar with ``progress`` on a terminal."""
    messages = ((p.name.encode(), p.read_bytes(), image_headers(p)) for p in files)
    with progress_bar(len(files), "image", quiet=not progress) as bar:
        return await publish(
            options, topic, messages, lambda n: bar.update(n - bar.n), check_topic=check_topic
        )


def oversized(files: list[Path], limit_bytes: int) -> list[str]:
    """One line per file larger than the service accepts: sending it would only dead-letter it."""
    return [
        f"{p}: {p.stat().st_size} bytes, above max_payload_bytes={limit_bytes}"
        for p in files
        if p.stat().st_size > limit_bytes
    ]


@one_line_errors("produce")
def _main(args: argparse.Namespace) -> int:
    files = expand(args.paths)
    settings = tool_settings(args)
    topic = args.topic or settings.input_topic
    limit_bytes = getattr(args, "max_payload_bytes", None) or settings.max_payload_bytes
    if too_large := oversized(files, limit_bytes):
        print("\n".join(too_large), file=sys.stderr)
        print(
            "nothing sent: raise STREAMER_MAX_PAYLOAD_BYTES (and the topic's max.message.bytes),"
            " or store large images elsewhere and send a reference to them",
            file=sys.stderr,
        )
        return 2
    count = asyncio.run(
        produce_files(client_options(args), topic, files, not args.quiet, check_topic=True)
    )
    print(f"published {count} images to {topic}")
    return 0
