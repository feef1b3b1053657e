"""A minimal HTTP client for tests, safe to call from a test that shares its loop with the service.

urllib blocks, so every request runs in a thread (``asyncio.to_thread``): the metrics
server under test lives on the test's own event loop and must keep running while
the test waits for its answer. The raw-socket helpers play the clients that send
a head in pieces, or nothing, or leave without reading.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Response:
    status: int
    content_type: str
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode()

    def json(self) -> Any:
        return json.loads(self.body)


def _request(url: str, method: str, data: bytes | None, timeout_s: float) -> Response:
    request = urllib.request.Request(url, data=data, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as reply:
            return Response(reply.status, reply.headers.get("Content-Type", ""), reply.read())
    except urllib.error.HTTPError as error:  # 4xx and 5xx: still an answer
        with error:
            return Response(error.code, error.headers.get("Content-Type", ""), error.read())


async def request(
    url: str, method: str = "GET", data: bytes | None = None, timeout_s: float = 10.0
) -> Response:
    """One HTTP request, answered with any status; connection errors raise ``OSError``."""
    return await asyncio.to_thread(_request, url, method, data, timeout_s)


# -- raw sockets, for clients that misbehave on purpose ------------------------------


async def raw_reply(port: int, head: bytes, timeout_s: float = 5.0) -> bytes:
    """Send ``head`` as is (possibly nothing) and read until the server closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head)
        return await asyncio.wait_for(reader.read(), timeout_s)
    finally:
        await close(writer)


async def raw_status(port: int, head: bytes, timeout_s: float = 5.0) -> int:
    """Send ``head`` as is (possibly nothing) and return the status code the server answers."""
    reply = await raw_reply(port, head, timeout_s)
    assert reply.startswith(b"HTTP/1.1 "), reply[:80]
    return int(reply.split(b" ", 2)[1])


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset (linger 0) rather than a FIN."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def closed_by_server(reader: asyncio.StreamReader, timeout_s: float = 5.0) -> bytes:
    """Wait until the server closes the connection (a FIN or a reset); what it sent first."""
    try:
        return await asyncio.wait_for(reader.read(), timeout_s)
    except ConnectionResetError:
        return b""


Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def open_silent(port: int, count: int) -> list[Connection]:
    """``count`` connections that never send a byte."""
    return [await asyncio.open_connection("127.0.0.1", port) for _ in range(count)]


async def close_all(connections: list[Connection]) -> None:
    for _, writer in connections:
        await close(writer)


def head_with(*headers: bytes) -> bytes:
    return (
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"".join(h + b"\r\n" for h in headers) + b"\r\n"
    )


async def trickle(writer: asyncio.StreamWriter, every_s: float) -> None:
    """A slowloris: a request line, then one header line every ``every_s``, never the end."""
    writer.write(b"GET /healthz HTTP/1.1\r\n")
    with contextlib.suppress(ConnectionError):
        for i in range(10_000):
            writer.write(b"X-Slow-%d: 1\r\n" % i)
            await writer.drain()
            await asyncio.sleep(every_s)


@contextlib.asynccontextmanager
async def stuck_scrape(port: int) -> AsyncIterator[asyncio.StreamWriter]:
    """A scrape whose client reads nothing, with a small receive buffer that fills at once."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # no receive autotuning
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    _, writer = await asyncio.open_connection(sock=sock, limit=4096)
    try:
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        yield writer
    finally:
        writer.transport.abort()
        await close(writer)
