"""The metrics HTTP server: routes, status codes and readiness, without Kafka or workers.

The hostile-client tests shrink the limits through the constructor, so that each runs
in a second or two rather than at the production deadlines.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from streamer.errors import ConfigError
from streamer.http import MetricsServer
from tests.httpclient import request

pytestmark = pytest.mark.timeout(30)


class Readiness:
    """A not-ready callable the test flips, standing in for the service's state."""

    def __init__(self) -> None:
        self.value = False

    def __call__(self) -> str | None:
        return None if self.value else "starting"


@pytest.fixture
def readiness() -> Readiness:
    return Readiness()


@pytest.fixture
def registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    Counter("streamer_things_total", "Things.", ["kind"], registry=registry).labels("a").inc(3)
    return registry


@pytest.fixture
async def base_url(registry: CollectorRegistry, readiness: Readiness) -> AsyncIterator[str]:
    server = MetricsServer("127.0.0.1", 0, registry, readiness)
    await server.start()
    try:
        assert server.port != 0, "port 0 must resolve to the bound port"
        yield f"http://127.0.0.1:{server.port}"
    finally:
        await server.stop()


async def test_readyz_follows_the_ready_callable(base_url: str, readiness: Readiness) -> None:
    not_ready = await request(f"{base_url}/readyz")
    readiness.value = True
    ready = await request(f"{base_url}/readyz")
    readiness.value = False
    not_ready_again = await request(f"{base_url}/readyz")

    assert (not_ready.status, not_ready.text) == (503, "not ready: starting\n")
    assert (ready.status, ready.text) == (200, "ready\n")
    assert not_ready_again.status == 503


async def test_healthz_answers_200_even_when_not_ready(base_url: str) -> None:
    reply = await request(f"{base_url}/healthz")
    assert (reply.status, reply.text) == (200, "ok\n")


async def test_metrics_serves_the_registry_in_prometheus_text_format(base_url: str) -> None:
    reply = await request(f"{base_url}/metrics")

    assert reply.status == 200
    assert reply.content_type == CONTENT_TYPE_LATEST
    families = {f.name: f for f in text_string_to_metric_families(reply.text)}
    samples = {
        (s.name, tuple(s.labels.items())): s.value for s in families["streamer_things"].samples
    }
    assert samples[("streamer_things_total", (("kind", "a"),))] == 3.0


async def test_query_string_is_ignored_when_routing(base_url: str, readiness: Readiness) -> None:
    readiness.value = True
    assert (await request(f"{base_url}/readyz?verbose=1")).status == 200


async def test_unknown_path_is_404(base_url: str) -> None:
    for path in ("/", "/metric", "/healthz/extra"):
        assert (await request(f"{base_url}{path}")).status == 404, path


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "HEAD"])
async def test_other_methods_than_get_are_405(base_url: str, method: str) -> None:
    data = b"x" if method in ("POST", "PUT") else None
    reply = await request(f"{base_url}/metrics", method=method, data=data)
    assert reply.status == 405


async def test_stop_closes_the_port(registry: CollectorRegistry, readiness: Readiness) -> None:
    server = MetricsServer("127.0.0.1", 0, registry, readiness)
    await server.start()
    port = server.port
    await server.stop()
    await server.stop()  # safe twice

    with pytest.raises(OSError):
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.close()
        await writer.wait_closed()


async def test_a_port_in_use_is_a_config_error_naming_the_setting(
    registry: CollectorRegistry, readiness: Readiness
) -> None:
    first = MetricsServer("127.0.0.1", 0, registry, readiness)
    await first.start()
    try:
        second = MetricsServer("127.0.0.1", first.port, registry, readiness)
        with pytest.raises(ConfigError, match=r"STREAMER_METRICS_PORT.*free port"):
            await second.start()
    finally:
        await first.stop()


# -- hostile clients --------------------------------------------------------------------


@contextlib.asynccontextmanager
async def serving(
    registry: CollectorRegistry, readiness: Callable[[], str | None], **limits: Any
) -> AsyncIterator[MetricsServer]:
    server = MetricsServer("127.0.0.1", 0, registry, readiness, **limits)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


async def raw_status(port: int, head: bytes, timeout_s: float = 5.0) -> int:
    """Send ``head`` as is (possibly nothing) and return the status code the server answers."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head)
        reply = await asyncio.wait_for(reader.read(), timeout_s)  # the server closes after it
    finally:
        await close(writer)
    assert reply.startswith(b"HTTP/1.1 "), reply[:80]
    return int(reply.split(b" ", 2)[1])


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset (linger 0) rather than a FIN."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def head_with(*headers: bytes) -> bytes:
    return (
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"".join(h + b"\r\n" for h in headers) + b"\r\n"
    )


async def test_a_client_trickling_header_lines_is_cut_off_at_the_head_deadline(
    registry: CollectorRegistry, readiness: Readiness
) -> None:
    async with serving(registry, readiness, head_timeout_s=1.0) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)

        async def trickle() -> None:
            """One header line every 0.5 s, never the blank line: each is well within 1 s."""
            writer.write(b"GET /healthz HTTP/1.1\r\n")
            with contextlib.suppress(ConnectionError):
                for i in range(60):
                    writer.write(b"X-Slow-%d: 1\r\n" % i)
                    await writer.drain()
                    await asyncio.sleep(0.5)

        loop = asyncio.get_running_loop()
        started = loop.time()
        trickler = asyncio.create_task(trickle())
        try:
            with contextlib.suppress(ConnectionError):  # cut off by a reset is cut off too
                reply = await asyncio.wait_for(reader.read(), 10.0)
                assert reply == b"" or reply.startswith(b"HTTP/1.1 408 "), reply[:80]
            elapsed = loop.time() - started
        finally:
            trickler.cancel()
            await asyncio.gather(trickler, return_exceptions=True)
            await close(writer)

        assert elapsed < 4.0, f"cut off after {elapsed:.1f} s, the head deadline is 1 s"
        assert (await request(f"http://127.0.0.1:{server.port}/healthz")).status == 200


async def test_more_header_lines_than_the_cap_are_431(
    registry: CollectorRegistry, readiness: Readiness
) -> None:
    async with serving(registry, readiness, max_header_lines=5) as server:
        at_cap = [b"X-H-%d: 1" % i for i in range(4)]  # with Host: 5 lines
        assert await raw_status(server.port, head_with(*at_cap)) == 200
        assert await raw_status(server.port, head_with(*at_cap, b"X-One-More: 1")) == 431


@pytest.mark.parametrize(
    ("headers", "why"),
    [
        ((b"X-Big: " + b"a" * 1500,), "one line longer than the head cap"),
        (tuple(b"X-H-%d: " % i + b"a" * 300 for i in range(4)), "short lines adding up"),
    ],
)
async def test_a_request_head_over_the_byte_cap_is_431(
    registry: CollectorRegistry, readiness: Readiness, headers: tuple[bytes, ...], why: str
) -> None:
    async with serving(registry, readiness, max_head_bytes=1024) as server:
        assert await raw_status(server.port, head_with(b"X-Fits: " + b"a" * 900)) == 200
        assert await raw_status(server.port, head_with(*headers)) == 431, why


async def test_connections_over_the_cap_are_refused_at_once_and_freed_slots_serve_again(
    registry: CollectorRegistry, readiness: Readiness
) -> None:
    async with serving(registry, readiness, max_connections=3, head_timeout_s=20.0) as server:
        idle = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(3)]
        try:
            await wait_until(lambda: server.open_connections == 3, "3 idle connections")
            # Silent idle clients would hold their slot for the 20 s head deadline; the
            # next one must not wait for that.
            assert await raw_status(server.port, b"", timeout_s=2.0) == 503
        finally:
            reset(idle[0][1])  # not a clean close: that handler fails with a reset
            for _, writer in idle[1:]:
                await close(writer)
            await close(idle[0][1])

        await wait_until(lambda: server.open_connections == 0, "the slots to free")
        assert (await request(f"http://127.0.0.1:{server.port}/healthz")).status == 200


async def test_a_handler_that_raises_gives_its_connection_slot_back(
    registry: CollectorRegistry,
) -> None:
    def broken() -> str | None:
        raise RuntimeError("readiness check broke")

    async with serving(registry, broken, max_connections=2) as server:
        for _ in range(3):  # more failures than slots
            with pytest.raises(OSError):  # the connection closes without an answer
                await request(f"http://127.0.0.1:{server.port}/readyz")
        await wait_until(lambda: server.open_connections == 0, "the failed slots to free")
        assert (await request(f"http://127.0.0.1:{server.port}/healthz")).status == 200


class HugeCollector(Collector):
    """A /metrics body far larger than the socket buffers, so a client that reads nothing
    leaves the server with unsent bytes."""

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily("streamer_huge", "Big.", labels=["blob"])
        family.add_metric(["x" * 16_000_000], 1.0)
        yield family


async def test_a_client_that_never_reads_is_dropped_at_the_write_deadline(
    readiness: Readiness,
) -> None:
    registry = CollectorRegistry()
    registry.register(HugeCollector())
    async with serving(registry, readiness, write_timeout_s=0.5) as server:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # no receive autotuning
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", server.port))
        _, writer = await asyncio.open_connection(sock=sock, limit=4096)
        try:
            writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            await writer.drain()
            await wait_until(lambda: server.open_connections == 1, "the request")
            await wait_until(lambda: server.open_connections == 0, "the drop", timeout_s=10.0)
        finally:
            writer.transport.abort()
            await close(writer)
        assert (await request(f"http://127.0.0.1:{server.port}/healthz")).status == 200
