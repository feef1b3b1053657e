"""The metrics HTTP server: routes, status codes and readiness, without Kafka or workers.

The hostile-client tests shrink the limits through the constructor, so that each runs
in a second or two rather than at the production deadlines; the probe tests keep the
head deadline long, so that no deadline, only how slots are handed out, lets a probe in.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from streamer.errors import ConfigError
from streamer.http import MAX_CONNECTIONS, MetricsServer
from tests.httpclient import (
    Connection,
    close,
    close_all,
    closed_by_server,
    head_with,
    open_silent,
    raw_status,
    request,
    reset,
    stuck_scrape,
    trickle,
)

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

# The chart's liveness probe gives up after 5 s; a probe must be answered well within it.
PROBE_BOUND_S = 2.0


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


async def timed_probe(url: str) -> tuple[int, float]:
    """A probe as the kubelet sends it: its status and the seconds it took."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    reply = await request(url, timeout_s=PROBE_BOUND_S * 2)
    return reply.status, loop.time() - started


async def test_a_client_trickling_header_lines_is_cut_off_at_the_head_deadline(
    registry: CollectorRegistry, readiness: Readiness
) -> None:
    async with serving(registry, readiness, head_timeout_s=1.0) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        loop = asyncio.get_running_loop()
        started = loop.time()
        # One header line every 0.5 s: each is well within the 1 s deadline.
        trickler = asyncio.create_task(trickle(writer, every_s=0.5))
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


async def test_probes_answer_while_silent_clients_and_a_slowloris_hold_every_connection(
    registry: CollectorRegistry, readiness: Readiness
) -> None:
    """The production connection limit, and a head deadline far beyond the probes' timeout,
    so that only the way slots are handed out can get the probes their answer."""
    readiness.value = True
    async with serving(registry, readiness, head_timeout_s=60.0) as server:
        silent = await open_silent(server.port, MAX_CONNECTIONS - 1)
        _, slow_writer = await asyncio.open_connection("127.0.0.1", server.port)
        slowloris = asyncio.create_task(trickle(slow_writer, every_s=0.1))
        try:
            await wait_until(lambda: server.open_connections == MAX_CONNECTIONS, "every slot")
            base = f"http://127.0.0.1:{server.port}"
            for _ in range(3):
                for path in ("/healthz", "/readyz"):
                    status, took_s = await timed_probe(f"{base}{path}")
                    assert status == 200, path
                    assert took_s < PROBE_BOUND_S, f"{path} took {took_s:.2f} s"
                    assert server.open_connections <= MAX_CONNECTIONS
        finally:
            slowloris.cancel()
            await asyncio.gather(slowloris, return_exceptions=True)
            await close(slow_writer)
            await close_all(silent)
        await wait_until(lambda: server.open_connections == 0, "the slots to free")


async def test_a_newcomer_at_the_limit_takes_the_slot_of_the_oldest_silent_connection(
    registry: CollectorRegistry, readiness: Readiness
) -> None:
    async with serving(registry, readiness, max_connections=3, head_timeout_s=20.0) as server:
        (oldest, *younger) = await open_silent(server.port, 3)
        try:
            await wait_until(lambda: server.open_connections == 3, "3 silent connections")

            # Silent clients would hold their slots for the 20 s head deadline.
            assert await raw_status(server.port, head_with(), timeout_s=2.0) == 200

            assert await closed_by_server(oldest[0], timeout_s=2.0) == b""  # no answer
            # The younger ones kept their slots: they are still served.
            for reader, writer in younger:
                writer.write(head_with())
                reply = await asyncio.wait_for(reader.read(), 2.0)
                assert reply.startswith(b"HTTP/1.1 200 "), reply[:80]
        finally:
            reset(younger[0][1])  # not a clean close: that handler fails with a reset
            await close_all([oldest, *younger])
        await wait_until(lambda: server.open_connections == 0, "the slots to free")


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


async def test_stop_resets_the_connections_still_open(
    registry: CollectorRegistry, readiness: Readiness
) -> None:
    server = MetricsServer("127.0.0.1", 0, registry, readiness, head_timeout_s=60.0)
    await server.start()
    silent = await open_silent(server.port, 2)
    try:
        await wait_until(lambda: server.open_connections == 2, "2 silent connections")
        await server.stop()
        for reader, _ in silent:
            assert await closed_by_server(reader, timeout_s=2.0) == b""
        await wait_until(lambda: server.open_connections == 0, "the handlers to end")
    finally:
        await close_all(silent)
        await server.stop()


def test_the_scrape_cap_must_leave_a_connection_for_the_probes(
    registry: CollectorRegistry, readiness: Readiness
) -> None:
    assert MetricsServer("127.0.0.1", 0, registry, readiness, max_connections=2) is not None
    with pytest.raises(ValueError, match="max_scrapes"):
        MetricsServer("127.0.0.1", 0, registry, readiness, max_connections=1)
    for scrapes in (0, 4, 5):
        with pytest.raises(ValueError, match="max_scrapes"):
            MetricsServer(
                "127.0.0.1", 0, registry, readiness, max_connections=4, max_scrapes=scrapes
            )


class HugeCollector(Collector):
    """A /metrics body far larger than the socket buffers, so a client that reads nothing
    leaves the server with unsent bytes."""

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily("streamer_huge", "Big.", labels=["blob"])
        family.add_metric(["x" * 16_000_000], 1.0)
        yield family


@pytest.fixture
def huge_registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(HugeCollector())
    return registry


async def test_a_client_that_never_reads_is_dropped_at_the_write_deadline(
    huge_registry: CollectorRegistry, readiness: Readiness
) -> None:
    async with serving(huge_registry, readiness, write_timeout_s=0.5) as server:
        async with stuck_scrape(server.port):
            await wait_until(lambda: server.open_connections == 1, "the request")
            await wait_until(lambda: server.open_connections == 0, "the drop", timeout_s=10.0)
        assert (await request(f"http://127.0.0.1:{server.port}/healthz")).status == 200


async def test_scrapes_over_the_cap_are_refused_at_once_and_never_cost_a_probe_its_answer(
    huge_registry: CollectorRegistry, readiness: Readiness
) -> None:
    limits = {"max_connections": 3, "max_scrapes": 1, "head_timeout_s": 60.0}
    async with serving(huge_registry, readiness, write_timeout_s=60.0, **limits) as server:
        async with stuck_scrape(server.port):
            await wait_until(lambda: server.scrapes == 1, "the page to be sent")
            scrape = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
            assert await raw_status(server.port, scrape, timeout_s=2.0) == 503

            silent = await open_silent(server.port, 2)
            try:
                await wait_until(lambda: server.open_connections == 3, "every slot")
                status, took_s = await timed_probe(f"http://127.0.0.1:{server.port}/healthz")
                assert (status, took_s < PROBE_BOUND_S) == (200, True), took_s
                assert server.scrapes == 1  # the page being sent kept its slot
            finally:
                await close_all(silent)
        await wait_until(lambda: server.open_connections == 0, "the slots to free")


# -- generated interleavings --------------------------------------------------------------

PROBES = ("/healthz", "/readyz")
REQUESTS = ("/metrics", "/healthz", "/readyz", "/nope")
FULL_HEAD = b"GET /healthz HTTP/1.1\r\nHost: x\r\nUser-Agent: y\r\n\r\n"

actions = st.lists(
    st.one_of(
        st.tuples(st.just("silent")),
        st.tuples(st.just("partial"), st.integers(1, len(FULL_HEAD) - 1)),
        st.tuples(st.just("more"), st.integers(0, 100), st.integers(1, 8)),
        st.tuples(st.just("complete"), st.sampled_from(REQUESTS)),
        st.tuples(st.just("leave"), st.integers(0, 100)),
        st.tuples(st.just("probe"), st.sampled_from(PROBES)),
    ),
    max_size=40,
)


async def play(steps: list[tuple[Any, ...]]) -> None:
    """Hostile and honest clients in the order given; every probe must be answered 200."""
    readiness = Readiness()
    readiness.value = True
    registry = CollectorRegistry()
    Counter("streamer_things_total", "Things.", registry=registry).inc()
    # Scrapes default to max_connections - 1 here: one slot is always left to take.
    async with serving(registry, readiness, max_connections=4, head_timeout_s=60.0) as server:
        held: list[tuple[Connection, int]] = []  # with the bytes of FULL_HEAD sent
        answers: list[asyncio.Task[bytes]] = []
        try:
            for step in steps:
                kind = step[0]
                if kind in ("silent", "partial"):
                    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
                    sent = step[1] if kind == "partial" else 0
                    writer.write(FULL_HEAD[:sent])
                    held.append(((reader, writer), sent))
                elif kind == "more" and held:
                    (reader, writer), sent = held[step[1] % len(held)]
                    if sent and not writer.is_closing():
                        # More of the head, never all of it: it stays a partial head.
                        upto = min(sent + step[2], len(FULL_HEAD) - 1)
                        writer.write(FULL_HEAD[sent:upto])
                        held[step[1] % len(held)] = ((reader, writer), upto)
                elif kind == "complete":
                    head = b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % step[1].encode()
                    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
                    writer.write(head)
                    held.append(((reader, writer), 0))
                    answers.append(asyncio.create_task(closed_by_server(reader)))
                elif kind == "leave" and held:
                    (_, writer), _ = held.pop(step[1] % len(held))
                    await close(writer)
                elif kind == "probe":
                    status, took_s = await timed_probe(f"http://127.0.0.1:{server.port}{step[1]}")
                    assert (status, took_s < PROBE_BOUND_S) == (200, True), (step, took_s)
                assert server.open_connections <= 4
            status, _ = await timed_probe(f"http://127.0.0.1:{server.port}/healthz")
            assert status == 200
        finally:
            await close_all([connection for connection, _ in held])
            await asyncio.gather(*answers, return_exceptions=True)
        await wait_until(lambda: server.open_connections == 0, "every slot to free")


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=actions)
@example(steps=[("silent",), ("partial", 9), ("silent",), ("partial", 30), ("probe", "/healthz")])
def test_probes_are_answered_whatever_other_clients_do_before_and_around_them(
    steps: list[tuple[Any, ...]],
) -> None:
    asyncio.run(play(steps))
