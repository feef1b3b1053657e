"""SIGKILL the inference worker during a run: every record still gets its prediction.

The reduced form runs in CI (`make test`); the full one (10 kills during a
2,000-image run) is marked ``chaos`` and runs with ``make chaos``.
"""

from __future__ import annotations

import json
import os
import signal

import pytest

from streamer import corpus
from streamer.workers.process import WorkerState
from tests.integration.helpers import (
    produce,
    read_exactly,
    running_service,
    service_settings,
    wait_for,
)

pytestmark = pytest.mark.integration


async def _kill_inference_during_run(
    kafka_bootstrap: str,
    kafka_options: dict[str, str],
    unique_name: str,
    new_topics,
    images: list[corpus.Sample],
    kills: int,
) -> None:
    settings = service_settings(
        kafka_bootstrap, unique_name, max_batch_size=8, max_record_attempts=5
    )
    await new_topics("in", "out", "dlq", partitions=3)
    async with running_service(settings) as service:
        pool = service.engine.inference
        assert pool is not None
        await produce(
            kafka_options,
            settings.input_topic,
            [(s.name.encode(), s.data, [("ce_id", s.name.encode())]) for s in images],
        )
        predicted = service.metrics.records_predicted.labels(settings.output_topic)
        step = len(images) // (kills + 1)
        for kill in range(1, kills + 1):
            await wait_for(
                lambda k=kill: predicted._value.get() >= k * step,
                600,
                f"{kill * step} predictions before kill {kill}",
            )
            await wait_for(lambda: pool.running, 120, "a running inference worker")
            victim = pool.workers[0]
            os.kill(victim.pid, signal.SIGKILL)  # type: ignore[arg-type]
            await wait_for(lambda v=victim: v.state is WorkerState.STOPPED, 30, "the death noticed")
        outputs = await read_exactly(kafka_options, settings.output_topic, len(images), 900)
        restarts = service.metrics.worker_restarts.labels("inference")._value.get()

    ids = [json.loads(r.value)["id"] for r in outputs]
    assert set(ids) == {s.name for s in images}, "a record was lost"
    assert restarts == kills
    dead = [r async for r in _dlq(kafka_options, settings.dlq_topic)]
    assert dead == [], "no valid image may be dead-lettered because a worker was killed"
    print(
        f"images={len(images)} kills={kills} outputs={len(ids)} "
        f"duplicates={len(ids) - len(set(ids))} lost=0"
    )


async def _dlq(options: dict[str, str], topic: str):  # type: ignore[no-untyped-def]
    from streamer.tools.consume import read_records

    async for record in read_records(options, topic):
        yield record


@pytest.mark.timeout(900)
async def test_inference_worker_killed_twice_loses_nothing(
    kafka_bootstrap: str,
    kafka_options: dict[str, str],
    unique_name: str,
    new_topics,
    samples: list[corpus.Sample],
) -> None:
    await _kill_inference_during_run(
        kafka_bootstrap, kafka_options, unique_name, new_topics, samples[:48], kills=2
    )


@pytest.mark.chaos
@pytest.mark.timeout(3600)
async def test_inference_worker_killed_ten_times_in_2000_images_loses_nothing(
    kafka_bootstrap: str,
    kafka_options: dict[str, str],
    unique_name: str,
    new_topics,
) -> None:
    images = list(corpus.generate(2000, seed=2))
    await _kill_inference_during_run(
        kafka_bootstrap, kafka_options, unique_name, new_topics, images, kills=10
    )
