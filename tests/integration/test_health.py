"""The running service's /healthz, /readyz and /metrics, through the real service and broker."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from streamer.app import Service, State
from streamer.metrics import Metrics
from tests.httpclient import request
from tests.integration.helpers import running_service, service_settings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def gate(step: Callable[[], Awaitable[None]], entered: asyncio.Event, release: asyncio.Event):
    """Wrap a lifecycle step so that it waits for ``release`` before running."""

    async def gated() -> None:
        entered.set()
        await release.wait()
        await step()

    return gated


async def test_readyz_is_503_until_started_and_again_once_stop_begins(
    kafka_bootstrap: str, unique_name: str, new_topics
) -> None:
    await new_topics("in", "out", "dlq", partitions=1)
    service = Service(service_settings(kafka_bootstrap, unique_name))
    # Hold start() between the metrics server coming up and the service turning
    # ready (the loop-lag monitor starts in between), and stop() between
    # "draining" and the metrics server going down (the engine stops in between).
    starting, let_start = asyncio.Event(), asyncio.Event()
    stopping, let_stop = asyncio.Event(), asyncio.Event()
    service.loop_lag.start = gate(service.loop_lag.start, starting, let_start)  # type: ignore[method-assign]
    service.engine.stop = gate(service.engine.stop, stopping, let_stop)  # type: ignore[method-assign]

    start = asyncio.create_task(service.start())
    stop: asyncio.Task[None] | None = None
    try:
        await asyncio.wait_for(starting.wait(), 180)
        assert service.metrics_port
        url = f"http://127.0.0.1:{service.metrics_port}"
        assert service.state is State.STARTING
        before_ready = await request(f"{url}/readyz")
        alive_before_ready = await request(f"{url}/healthz")

        let_start.set()
        await asyncio.wait_for(start, 60)
        ready = await request(f"{url}/readyz")
        alive = await request(f"{url}/healthz")

        stop = asyncio.create_task(service.stop())
        await asyncio.wait_for(stopping.wait(), 60)
        assert service.state is State.DRAINING
        draining = await request(f"{url}/readyz")
    finally:
        let_start.set()
        let_stop.set()
        if stop is None:
            stop = asyncio.create_task(service.stop())
        await asyncio.gather(start, return_exceptions=True)
        await asyncio.wait_for(stop, 120)

    assert (before_ready.status, alive_before_ready.status) == (503, 200)
    assert (ready.status, ready.text, alive.status) == (200, "ready\n", 200)
    assert draining.status == 503
    with pytest.raises(OSError):  # the metrics server is gone once stopped
        await request(f"{url}/healthz", timeout_s=5)


async def test_metrics_exports_every_streamer_metric_in_text_format(
    kafka_bootstrap: str, unique_name: str, new_topics
) -> None:
    await new_topics("in", "out", "dlq", partitions=1)
    settings = service_settings(kafka_bootstrap, unique_name)
    async with running_service(settings) as service:
        url = f"http://127.0.0.1:{service.metrics_port}"
        reply = await request(f"{url}/metrics")
        not_found = await request(f"{url}/nope")
        not_allowed = await request(f"{url}/metrics", method="POST", data=b"x")

    assert reply.status == 200
    assert reply.content_type == CONTENT_TYPE_LATEST
    families = {f.name: f for f in text_string_to_metric_families(reply.text)}
    # Every family the service defines, read from a fresh Metrics(): a renamed or
    # dropped metric, or one registered elsewhere, shows up here.
    fresh = generate_latest(Metrics().registry).decode()
    expected = {f.name for f in text_string_to_metric_families(fresh)}
    assert expected, "Metrics() defines no metric families"
    assert expected <= families.keys(), f"missing: {sorted(expected - families.keys())}"
    assert all(name.startswith(("streamer_", "process_", "python_")) for name in families)

    def value(family: str, sample: str, **labels: str) -> float:
        for s in families[family].samples:
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
        raise AssertionError(f"no sample {sample}{labels} in {families[family].samples}")

    assert value("streamer_ready", "streamer_ready") == 1.0
    assert value("streamer_free_permits", "streamer_free_permits") == settings.max_in_flight
    assert value("streamer_workers_alive", "streamer_workers_alive", kind="decode") == 1.0
    assert value("streamer_model_info", "streamer_model_info", name="resnet18") == 1.0
    assert value("streamer_shared_memory_bytes", "streamer_shared_memory_bytes") > 0
    assert (not_found.status, not_allowed.status) == (404, 405)
