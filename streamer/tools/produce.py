"""``streamer produce PATH...``: publish image files to the input topic.

Paths may be files, folders (every file inside, recursively) or glob patterns.
Each record's value is the file's bytes, its key the file name, and its headers
``content-type`` (from the extension), ``ce_id`` (a fresh UUID) and a W3C
``traceparent``.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import mimetypes
import secrets
import sys
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaProducer

from streamer.schemas import HEADER_CONTENT_TYPE, HEADER_ID, HEADER_TRACEPARENT, Headers
from streamer.tools.common import add_connection_flags, client_options, tool_settings


def add_parser(commands: Any) -> None:
    parser = commands.add_parser("produce", help="publish image files to the input topic")
    add_connection_flags(parser)
    parser.add_argument("paths", nargs="+", help="files, folders or glob patterns")
    parser.add_argument("--topic", default=None, help="default: the configured input topic")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
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
                raise FileNotFoundError(f"no such file or folder: {match}")
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
) -> int:
    """Send every message with an idempotent acks=all producer; return once all are acked."""
    producer = AIOKafkaProducer(
        acks="all",
        enable_idempotence=True,
        linger_ms=5,
        max_request_size=64 * 1024 * 1024,
        **options,
    )
    await producer.start()
    try:
        pending = [
            await producer.send(topic, value, key=key, headers=headers)
            for key, value, headers in messages
        ]
        for acked, future in enumerate(pending, start=1):
            await future
            if on_ack is not None:
                on_ack(acked)
    finally:
        await producer.stop()
    return len(pending)


async def produce_files(
    options: dict[str, Any], topic: str, files: list[Path], progress: bool = True
) -> int:
    messages = ((p.name.encode(), p.read_bytes(), image_headers(p)) for p in files)
    count = await publish(
        options, topic, messages, (lambda n: _progress(n, len(files))) if progress else None
    )
    if progress:
        print(file=sys.stderr)
    return count


def _progress(done: int, total: int, width: int = 30) -> None:
    filled = width * done // max(total, 1)
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} images acked")
    sys.stderr.flush()


def oversized(files: list[Path], limit_bytes: int) -> list[str]:
    """One line per file larger than the service accepts: sending it would only dead-letter it."""
    return [
        f"{p}: {p.stat().st_size} bytes, above max_payload_bytes={limit_bytes}"
        for p in files
        if p.stat().st_size > limit_bytes
    ]


def _main(args: argparse.Namespace) -> int:
    files = expand(args.paths)
    settings = tool_settings(args)
    topic = args.topic or settings.input_topic
    if too_large := oversized(files, settings.max_payload_bytes):
        print("\n".join(too_large), file=sys.stderr)
        print(
            "nothing sent: raise STREAMER_MAX_PAYLOAD_BYTES (and the topic's max.message.bytes),"
            " or store large images elsewhere and send a reference to them",
            file=sys.stderr,
        )
        return 2
    count = asyncio.run(produce_files(client_options(args), topic, files, not args.quiet))
    print(f"published {count} images to {topic}")
    return 0
