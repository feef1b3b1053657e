"""Stop and restart the broker mid-run: the service recovers by itself and loses nothing.

This test needs a broker it may stop, so it starts its own KRaft broker on a
separate port with deploy/kafka/kafkactl (the session broker stays untouched).
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import subprocess
from collections.abc import Iterator

import pytest

from streamer import corpus
from streamer.tools.admin import create_topics
from tests.conftest import KAFKACTL
from tests.httpclient import Response, request
from tests.integration.helpers import (
    count_by_id,
    output_ids,
    produce,
    read_all,
    running_service,
    service_settings,
    wait_for,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(900),
]

PORT = int(os.environ.get("STREAMER_TEST_RESTART_PORT", "19392"))


def kafkactl(command: str) -> None:
    env = {**os.environ, "KAFKA_PORT": str(PORT)}
    subprocess.run([str(KAFKACTL), command], check=True, timeout=180, env=env)


# When the broker goes away mid-run, aiokafka drops some of its connections without
# closing them; they are garbage-collected later, and their ResourceWarnings used to
# fail whichever test ran the collection (test_contract.py, once). Collect them at
# the end of each test here, where they come from; pyproject.toml lets exactly these
# ResourceWarnings pass.
@pytest.fixture(autouse=True)
def collect_dropped_connections() -> Iterator[None]:
    yield
    gc.collect()


@pytest.fixture
def own_broker() -> Iterator[str]:
    kafkactl("up")
    try:
        yield f"127.0.0.1:{PORT}"
    finally:
        kafkactl("down")


@pytest.mark.parametrize("delivery", ["at-least-once", "exactly-once"])
async def test_service_survives_a_broker_restart(
    own_broker: str, unique_name: str, samples: list[corpus.Sample], delivery: str
) -> None:
    options = {"bootstrap_servers": own_broker}
    settings = service_settings(own_broker, unique_name, max_batch_size=8, delivery=delivery)
    await create_topics(options, [f"{unique_name}-{s}" for s in ("in", "out", "dlq")], 2)
    first, second = samples[:30], samples[30:60]

    async with running_service(settings) as service:
        predicted = service.metrics.records_predicted.labels(settings.output_topic)
        await produce(options, settings.input_topic, _messages(first))
        await wait_for(lambda: predicted._value.get() >= 10, 300, "predictions before the restart")

        await asyncio.to_thread(kafkactl, "down")  # mid-run: work is in flight
        await asyncio.to_thread(kafkactl, "up")

        await produce(options, settings.input_topic, _messages(second))
        await wait_for(
            lambda: predicted._value.get() >= len(first) + len(second),
            float(os.environ.get("RESTART_WAIT_S", "600")),
            "every prediction after the restart",
        )
        assert service.state.value == "running"

    expected = {s.name for s in first + second}

    async def all_visible() -> bool:  # commit markers land shortly after the commit returns
        return await output_ids(options, settings.output_topic) == expected

    await wait_for(all_visible, 60, "every committed output to be visible")
    outputs = await read_all(options, settings.output_topic)
    assert {json.loads(r.value)["id"] for r in outputs} == expected
    distinct, duplicates = count_by_id(outputs)
    if delivery == "exactly-once":
        assert duplicates == 0
    print(f"delivery={delivery} inputs={distinct} lost=0 duplicates={duplicates}")


async def test_readyz_is_503_while_the_broker_is_away_and_200_once_it_is_back(
    own_broker: str, unique_name: str
) -> None:
    options = {"bootstrap_servers": own_broker}
    settings = service_settings(own_broker, unique_name)
    await create_topics(options, [f"{unique_name}-{s}" for s in ("in", "out", "dlq")], 2)
    async with running_service(settings) as service:
        url = f"http://127.0.0.1:{service.metrics_port}/readyz"
        ready = await wait_for_readyz(url, 200, 60)
        await asyncio.to_thread(kafkactl, "down")
        away = await wait_for_readyz(url, 503, 30)
        await asyncio.to_thread(kafkactl, "up")
        back = await wait_for_readyz(url, 200, 60)
        assert service.state.value == "running"
    assert ready.text == "ready\n"
    assert away.text.startswith(f"not ready: no coordinator for group {unique_name!r}"), away.text
    assert own_broker in away.text
    assert back.text == "ready\n"


async def wait_for_readyz(url: str, status: int, timeout_s: float) -> Response:
    """The first /readyz answer with ``status``; fails after ``timeout_s``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        response = await request(url)
        if response.status == status:
            return response
        assert loop.time() < deadline, f"/readyz not {status} within {timeout_s} s: {response}"
        await asyncio.sleep(0.5)


def _messages(images: list[corpus.Sample]) -> list[tuple[bytes, bytes, list[tuple[str, bytes]]]]:
    return [(s.name.encode(), s.data, [("ce_id", s.name.encode())]) for s in images]
