"""The metrics HTTP server, on the event loop: ``/metrics``, ``/healthz``, ``/readyz``.

A deliberately tiny HTTP/1.1 server on ``asyncio.start_server`` (GET only, one
request per connection), so the event loop stays the only thread and no web
framework is needed. It binds to loopback unless configured otherwise.

Invariants, so that no client can hold the server (or the loop's memory) open,
and none can keep the probes from an answer:

1. The whole request head (request line and headers) is read under one deadline;
   a client that trickles header lines is answered 408 and closed when it passes.
2. The head has a byte cap and a header-line cap; beyond either the answer is 431.
3. Every response is written under a deadline; a client that never reads is
   aborted, not waited for.
4. At most ``max_connections`` connections are open at once, and a newcomer is
   never refused for want of one: at the limit it takes the slot of the oldest
   connection that is not being sent a ``/metrics`` page, which is reset.
5. At most ``max_scrapes`` (fewer than ``max_connections``, so that 4 always finds
   a slot to take) ``/metrics`` pages are rendered and sent at once; another scrape
   is answered 503 before its page is rendered. Memory stays bounded: at most
   ``max_connections`` heads and ``max_scrapes`` pages.
6. Both counts are kept in ``try``/``finally``, so they stay exact when a handler
   fails, and ``stop()`` resets every open connection.

Why a newcomer evicts the oldest (4), rather than being refused or a reserve kept
for probes: a refused newcomer lets whoever holds the slots decide who is served,
and any pod that can reach the port could hold them with silent sockets and get the
service restarted by failing liveness probes. A shorter head deadline only shortens
each hold: a client that reconnects holds the slots for good. A reserve for probes
fills like the rest, since a probe is known only once its head is read. A probe, like
any honest client, sends its head in its first packet and is answered within a few
turns of the loop, so it is among the youngest connections; the oldest is the one
that has had longest to send a few hundred bytes and has not. Idle and slow clients
thus push each other out, never a newcomer; only more than ``max_connections`` new
connections within a probe's few turns could, and such a flood takes the loop's CPU
whatever the slots do. Only a connection being sent a page is
spared: cutting it would throw away the render and leave a gap in Prometheus, and the
scrape cap (5) keeps such connections too few to fill the limit. Every other answer is
a few bytes that the socket buffer takes at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from streamer.errors import ConfigError

log = logging.getLogger(__name__)

# A scraper or probe sends a handful of short headers; 100 lines and 16 KiB leave room
# for proxies that add their own, while bounding what one connection can make us buffer.
MAX_HEADER_LINES = 100
MAX_HEAD_BYTES = 16 * 1024
# One deadline for the whole head, not per line: otherwise a header every few seconds
# keeps a connection open forever. Local scrapers send their head in one packet.
HEAD_TIMEOUT_S = 5.0
# A client that stops reading must not pin the connection and the response buffer.
WRITE_TIMEOUT_S = 5.0
# Prometheus, kubelet probes and an operator's curl need a few connections; 64 bounds
# the handlers (and file descriptors) open at once, and at the limit the oldest idle
# one makes way (invariant 4), so idle or slow clients cannot keep anyone out.
MAX_CONNECTIONS = 64
# An HA pair of Prometheus servers and an operator's curl scrape at once; a page is the
# one answer that costs CPU to render and memory until a slow reader has it.
MAX_SCRAPES = 8


class _HeadTooLarge(Exception):
    """The request head broke the byte or header-line cap (answered 431)."""


class _Connection:
    """One open connection: its transport (to reset it) and whether a page is being sent."""

    __slots__ = ("scraping", "transport")

    def __init__(self, transport: asyncio.WriteTransport) -> None:
        self.transport = transport
        self.scraping = False


class MetricsServer:
    def __init__(
        self,
        host: str,
        port: int,
        registry: CollectorRegistry,
        not_ready: Callable[[], str | None],
        *,
        max_header_lines: int = MAX_HEADER_LINES,
        max_head_bytes: int = MAX_HEAD_BYTES,
        head_timeout_s: float = HEAD_TIMEOUT_S,
        write_timeout_s: float = WRITE_TIMEOUT_S,
        max_connections: int = MAX_CONNECTIONS,
        max_scrapes: int | None = None,
    ) -> None:
        """``not_ready`` says why the service is not ready, or None when it is.

        ``max_scrapes`` defaults to ``MAX_SCRAPES``, or to one below ``max_connections``
        where that is fewer.
        """
        if max_scrapes is None:
            max_scrapes = min(MAX_SCRAPES, max_connections - 1)
        if not 0 < max_scrapes < max_connections:
            raise ValueError(
                f"max_scrapes ({max_scrapes}) must be at least 1 and below"
                f" max_connections ({max_connections})"
            )
        self._host = host
        self._port = port
        self._registry = registry
        self._not_ready = not_ready
        self._max_header_lines = max_header_lines
        self._max_head_bytes = max_head_bytes
        self._head_timeout_s = head_timeout_s
        self._write_timeout_s = write_timeout_s
        self._max_connections = max_connections
        self._max_scrapes = max_scrapes
        # Oldest first (a dict keeps insertion order): the eviction order of invariant 4.
        self._connections: dict[_Connection, None] = {}
        self._scrapes = 0
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        """The bound port (useful when configured as 0)."""
        if self._server is None or not self._server.sockets:
            return self._port
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def open_connections(self) -> int:
        """Connections open now: reading their head or being answered."""
        return len(self._connections)

    @property
    def scrapes(self) -> int:
        """``/metrics`` pages being rendered or sent now."""
        return self._scrapes

    async def start(self) -> None:
        try:
            # The stream limit caps a single line; the head as a whole is capped in _read_head.
            self._server = await asyncio.start_server(
                self._handle, self._host, self._port, limit=self._max_head_bytes
            )
        except OSError as exc:
            raise ConfigError(
                f"cannot serve /metrics on {self._host}:{self._port} ({exc.strerror or exc}): "
                "set --metrics-port (STREAMER_METRICS_PORT) to a free port, or 0 for any"
            ) from exc
        log.info("metrics server listening host=%s port=%d", self._host, self.port)

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            # From Python 3.12 wait_closed() waits for the open connections, and a silent
            # client would hold the shutdown for the head deadline.
            for connection in list(self._connections):
                connection.transport.abort()
            await server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = _Connection(writer.transport)
        if len(self._connections) >= self._max_connections:
            self._evict_oldest()
        self._connections[connection] = None
        try:
            await self._serve(reader, writer, connection)
        except ConnectionError:
            pass
        finally:
            self._connections.pop(connection, None)
            writer.close()

    def _evict_oldest(self) -> None:
        """Reset the oldest connection not being sent a page; its handler sees EOF."""
        # Found within max_scrapes + 1 steps: fewer than max_connections are scraping.
        oldest = next(c for c in self._connections if not c.scraping)
        del self._connections[oldest]
        log.debug("metrics connection evicted open=%d", len(self._connections))
        oldest.transport.abort()

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, connection: _Connection
    ) -> None:
        try:
            request_line = await self._read_head(reader)
        except _HeadTooLarge:
            await self._respond(
                writer, "431 Request Header Fields Too Large", "text/plain", b"head too large\n"
            )
            return
        except TimeoutError:
            await self._respond(writer, "408 Request Timeout", "text/plain", b"head too slow\n")
            return
        if request_line is None:
            return  # the client left (or was evicted) before finishing its request
        method, _, rest = request_line.decode("latin-1").partition(" ")
        path = rest.split(" ", 1)[0].split("?", 1)[0]
        if method == "GET" and path == "/metrics":
            await self._scrape(writer, connection)
        else:
            await self._respond(writer, *self._route(method, path))

    async def _scrape(self, writer: asyncio.StreamWriter, connection: _Connection) -> None:
        if self._scrapes >= self._max_scrapes:
            log.debug("metrics scrape refused scrapes=%d", self._scrapes)
            await self._respond(
                writer, "503 Service Unavailable", "text/plain", b"too many scrapes\n"
            )
            return
        self._scrapes += 1
        connection.scraping = True
        try:
            page = generate_latest(self._registry)
            await self._respond(writer, "200 OK", CONTENT_TYPE_LATEST, page)
        finally:
            connection.scraping = False
            self._scrapes -= 1

    async def _read_head(self, reader: asyncio.StreamReader) -> bytes | None:
        """The request line, after the headers are read and discarded; None on early EOF."""
        async with asyncio.timeout(self._head_timeout_s):
            request_line = await self._read_line(reader)
            head_bytes = len(request_line)
            header_lines = 0
            while request_line:
                line = await self._read_line(reader)
                head_bytes += len(line)
                if head_bytes > self._max_head_bytes:
                    raise _HeadTooLarge
                if line in (b"\r\n", b"\n"):
                    return request_line
                if not line:
                    break
                header_lines += 1
                if header_lines > self._max_header_lines:
                    raise _HeadTooLarge
        return None

    @staticmethod
    async def _read_line(reader: asyncio.StreamReader) -> bytes:
        try:
            return await reader.readline()
        except ValueError as exc:  # one line longer than the stream limit
            raise _HeadTooLarge from exc

    async def _respond(
        self, writer: asyncio.StreamWriter, status: str, content_type: str, body: bytes
    ) -> None:
        writer.write(
            f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            + body
        )
        try:
            await asyncio.wait_for(writer.drain(), self._write_timeout_s)
        except TimeoutError:
            # close() would wait for the unsent buffer to flush, i.e. for this client.
            log.debug("metrics client too slow to read status=%s", status)
            writer.transport.abort()

    def _route(self, method: str, path: str) -> tuple[str, str, bytes]:
        if method != "GET":
            return "405 Method Not Allowed", "text/plain", b"GET only\n"
        if path == "/healthz":
            return "200 OK", "text/plain", b"ok\n"
        if path == "/readyz":
            reason = self._not_ready()
            if reason is None:
                return "200 OK", "text/plain", b"ready\n"
            return "503 Service Unavailable", "text/plain", f"not ready: {reason}\n".encode()
        return "404 Not Found", "text/plain", b"not found\n"
