"""The metrics HTTP server, on the event loop: ``/metrics``, ``/healthz``, ``/readyz``.

A deliberately tiny HTTP/1.1 server on ``asyncio.start_server`` (GET only, one
request per connection), so the event loop stays the only thread and no web
framework is needed. It binds to loopback unless configured otherwise.

Invariants, so that no client can hold the server (or the loop's memory) open:

1. The whole request head (request line and headers) is read under one deadline;
   a client that trickles header lines is answered 408 and closed when it passes.
2. The head has a byte cap and a header-line cap; beyond either the answer is 431.
3. Every response is written under a deadline; a client that never reads is
   aborted, not waited for.
4. At most ``max_connections`` connections are served at once; more are answered
   503 at once. The count is taken in ``try``/``finally``, so it stays exact when
   a handler fails.
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
# the handlers (and file descriptors) that idle or slow clients can take from the loop.
MAX_CONNECTIONS = 64


class _HeadTooLarge(Exception):
    """The request head broke the byte or header-line cap (answered 431)."""


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
    ) -> None:
        """``not_ready`` says why the service is not ready, or None when it is."""
        self._host = host
        self._port = port
        self._registry = registry
        self._not_ready = not_ready
        self._max_header_lines = max_header_lines
        self._max_head_bytes = max_head_bytes
        self._head_timeout_s = head_timeout_s
        self._write_timeout_s = write_timeout_s
        self._max_connections = max_connections
        self._open_connections = 0
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        """The bound port (useful when configured as 0)."""
        if self._server is None or not self._server.sockets:
            return self._port
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def open_connections(self) -> int:
        """Connections being served now (refused ones are not counted)."""
        return self._open_connections

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
            await server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if self._open_connections >= self._max_connections:
                log.debug("metrics connection refused open=%d", self._open_connections)
                await self._respond(
                    writer, "503 Service Unavailable", "text/plain", b"too many connections\n"
                )
                return
            self._open_connections += 1
            try:
                await self._serve(reader, writer)
            finally:
                self._open_connections -= 1
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
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
            return  # the client left before finishing its request
        method, _, rest = request_line.decode("latin-1").partition(" ")
        path = rest.split(" ", 1)[0].split("?", 1)[0]
        await self._respond(writer, *self._route(method, path))

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
        if path == "/metrics":
            return "200 OK", CONTENT_TYPE_LATEST, generate_latest(self._registry)
        if path == "/healthz":
            return "200 OK", "text/plain", b"ok\n"
        if path == "/readyz":
            reason = self._not_ready()
            if reason is None:
                return "200 OK", "text/plain", b"ready\n"
            return "503 Service Unavailable", "text/plain", f"not ready: {reason}\n".encode()
        return "404 Not Found", "text/plain", b"not found\n"
