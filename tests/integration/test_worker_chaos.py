"""SIGKILL the inference worker during a run: every record still gets its prediction.

In both delivery modes nothing is lost; in exactly-once mode nothing is
duplicated either (the verifier reads ``read_committed``). The reduced form runs
in CI (`make test`); the full one (10 kills during a 2,000-image run) is marked
``chaos`` and runs with ``make chaos``.
"""

from __future__ import annotations

import json
import os
import signal

import pytest

from streamer import corpus
from streamer.workers.process import WorkerState
from tests.integration.helpers import (
    count_by_id,
    produce,
    read_all,
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
    delivery: str,
) -> None:
    settings = service_settings(
        kafka_bootstrap,
        unique_name,
        inference_standby=True,
        max_batch_size=8,
        max_record_attempts=5,
        delivery=delivery,
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
        first = await read_exactly(kafka_options, settings.output_topic, len(images), 900)
        restarts = service.metrics.worker_restarts.labels("inference")._value.get()

    assert {json.loads(r.value)["id"] for r in first} == {s.name for s in images}, "lost"
    assert restarts == kills
    outputs = await read_all(kafka_options, settings.output_topic)
    distinct, duplicates = count_by_id(outputs)
    assert distinct == len(images)
    if delivery == "exactly-once":
        assert duplicates == 0
    dead = await read_all(kafka_options, settings.dlq_topic)
    assert dead == [], "no valid image may be dead-lettered because a worker was killed"
    print(
        f"delivery={delivery} images={len(images)} kills={kills} outputs={len(outputs)} "
        f"duplicates={duplicates} lost=0"
    )


@pytest.mark.timeout(900)
@pytest.mark.parametrize("delivery", ["at-least-once", "exactly-once"])
async def test_inference_worker_killed_twice_loses_nothing(
    kafka_bootstrap: str,
    kafka_options: dict[str, str],
    unique_name: str,
    new_topics,
    samples: list[corpus.Sample],
    delivery: str,
) -> None:
    await _kill_inference_during_run(
        kafka_bootstrap, kafka_options, unique_name, new_topics, samples[:48], 2, delivery
    )


@pytest.mark.chaos
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("delivery", ["at-least-once", "exactly-once"])
async def test_inference_worker_killed_ten_times_in_2000_images_loses_nothing(
    kafka_bootstrap: str,
    kafka_options: dict[str, str],
    unique_name: str,
    new_topics,
    delivery: str,
) -> None:
    images = list(corpus.generate(2000, seed=2))
    await _kill_inference_during_run(
        kafka_bootstrap, kafka_options, unique_name, new_topics, images, 10, delivery
    )
