"""What the command-line tools share: connection flags, started clients, progress bars.

``connected`` is how every tool starts a Kafka client: the start is bounded (a
wrong address fails within ``CONNECT_TIMEOUT_S`` with the address it tried),
and the client is stopped on every way out, so no run ends with aiokafka's
"Unclosed AIOKafkaProducer" warning.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator, Iterable
from typing import Any, Protocol, TextIO, TypeVar

from aiokafka.errors import KafkaConnectionError
from tqdm import tqdm

from streamer.config import Settings
from streamer.kafka.clients import connection_options
from streamer.tools.errors import BrokerUnreachable, TopicMissing

# Refused connections fail at once; this bounds an address that does not answer at all.
CONNECT_TIMEOUT_S = 10.0


class KafkaClient(Protocol):
    async def start(self) -> None: ...


Client = TypeVar("Client", bound=KafkaClient)


def add_connection_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--bootstrap-servers",
        default=None,
        help="Kafka bootstrap servers (env STREAMER_BOOTSTRAP_SERVERS; "
        "the docker-compose stack publishes Kafka on 127.0.0.1:9094)",
    )


def tool_settings(args: argparse.Namespace) -> Settings:
    given = {"bootstrap_servers": args.bootstrap_servers} if args.bootstrap_servers else {}
    return Settings(**given, client_id=f"streamer-{args.command}-{os.getpid()}")


def client_options(args: argparse.Namespace) -> dict[str, Any]:
    return connection_options(tool_settings(args))


async def _close(client: Any) -> None:
    # Producers and consumers stop(), the admin client close()s; both are safe after
    # a failed or cancelled start.
    stop = getattr(client, "stop", None) or client.close
    await stop()


@contextlib.asynccontextmanager
async def connected(
    client: Client, bootstrap_servers: str, timeout_s: float = CONNECT_TIMEOUT_S
) -> AsyncIterator[Client]:
    """``client`` started within ``timeout_s`` (else BrokerUnreachable), stopped at exit."""
    try:
        await asyncio.wait_for(client.start(), timeout_s)
    except KafkaConnectionError as exc:
        await _close(client)
        raise BrokerUnreachable(bootstrap_servers, "connection failed") from exc
    except TimeoutError as exc:
        await _close(client)
        raise BrokerUnreachable(bootstrap_servers, f"no answer within {timeout_s:g} s") from exc
    except BaseException:
        await _close(client)
        raise
    try:
        yield client
    finally:
        await _close(client)


def require_topic(known: Iterable[str], topic: str) -> None:
    """TopicMissing unless ``topic`` is among ``known`` (from a full metadata request,
    which, unlike asking for the topic by name, never auto-creates it)."""
    if topic not in set(known):
        raise TopicMissing(topic)


def progress_bar(total: int, unit: str, quiet: bool = False, stream: TextIO | None = None) -> tqdm:
    """A tqdm bar on ``stream`` (stderr), shown only to a person: off with ``quiet`` and
    whenever the stream is not a terminal, so CI logs get no carriage returns."""
    stream = stream if stream is not None else sys.stderr
    shown = not quiet and stream.isatty()
    return tqdm(total=total, unit=unit, file=stream, disable=not shown, dynamic_ncols=True)
