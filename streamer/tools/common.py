"""What the command-line tools share: connection flags."""

from __future__ import annotations

import argparse
import os
from typing import Any

from streamer.config import Settings
from streamer.kafka.clients import connection_options


def add_connection_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--bootstrap-servers",
        default=None,
        help="Kafka bootstrap servers (env STREAMER_BOOTSTRAP_SERVERS)",
    )


def tool_settings(args: argparse.Namespace) -> Settings:
    given = {"bootstrap_servers": args.bootstrap_servers} if args.bootstrap_servers else {}
    return Settings(**given, client_id=f"streamer-{args.command}-{os.getpid()}")


def client_options(args: argparse.Namespace) -> dict[str, Any]:
    return connection_options(tool_settings(args))
