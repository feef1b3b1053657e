"""The metrics HTTP server: routes, status codes and readiness, without Kafka or workers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter
from prometheus_client.parser import text_string_to_metric_families

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
