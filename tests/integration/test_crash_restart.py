"""SIGKILL the whole service at random points and restart it: nothing is lost.

At-least-once may duplicate what was acked but not yet committed at each kill;
exactly-once may not: the verifier reads with ``read_committed`` and counts
every id once. The reduced form (2 kills, 120 images) runs in CI; the full one
(5 kills, 400 images) is marked ``chaos`` and runs with ``make chaos``.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from streamer import corpus
from streamer.workers.shm import SHM_DIR
from tests.integration.helpers import (
    ServiceProcess,
    count_by_id,
    output_ids,
    produce,
    read_all,
    service_settings,
    wait_for,
)

pytestmark = pytest.mark.integration


async def _kill_service_repeatedly(
    kafka_bootstrap: str,
    kafka_options: dict[str, str],
    unique_name: str,
    new_topics,
    images: list[corpus.Sample],
    kills: int,
    delivery: str,
    log_dir: Path,
) -> None:
    settings = service_settings(
        kafka_bootstrap,
        unique_name,
        max_batch_size=8,
        commit_interval_ms=100,
        delivery=delivery,
        log_level="DEBUG",
    )
    await new_topics("in", "out", "dlq", partitions=3)
    await produce(
        kafka_options,
        settings.input_topic,
        [(s.name.encode(), s.data, [("ce_id", s.name.encode())]) for s in images],
    )
    expected = {s.name for s in images}
    rng = random.Random(f"{delivery}-{kills}")
    service = ServiceProcess(settings, log_dir / "service.log")
    pids = []

    async def predicted() -> set[str]:
        service.check_alive()
        return await output_ids(kafka_options, settings.output_topic)

    try:
        for kill in range(kills):
            service.start()
            pids.append(service.process.pid if service.process else -1)
            # A random point between "some progress since the last kill" and the end.
            before = len(await output_ids(kafka_options, settings.output_topic))
            share = (len(expected) - before) // (kills - kill + 1)
            target = before + rng.randint(2, max(3, share))

            async def reached(t: int = target) -> bool:
                return len(await predicted()) >= t

            await wait_for(reached, 300, f"{target} predictions before kill {kill + 1}")
            service.kill()
        seen = await output_ids(kafka_options, settings.output_topic)
        assert len(seen) < len(expected), "the last kill should land mid-stream"

        service.start()
        pids.append(service.process.pid if service.process else -1)

        async def all_predicted() -> bool:
            return expected <= await predicted()

        await wait_for(all_predicted, 600, "every input to have an output")
        assert service.terminate() == 0, service.log()
    finally:
        if service.process and service.process.poll() is None:
            service.kill()

    outputs = await read_all(kafka_options, settings.output_topic)
    distinct, duplicates = count_by_id(outputs)
    assert distinct == len(expected)  # nothing lost (and nothing invented: see output_ids)
    if delivery == "exactly-once":
        assert duplicates == 0
    aborted = len(await read_all(kafka_options, settings.output_topic, "read_uncommitted"))
    print(
        f"delivery={delivery} kills={kills} inputs={len(expected)} lost=0 "
        f"duplicates={duplicates} aborted_outputs={aborted - len(outputs)}"
    )
    # Each killed instance's segments were swept by the next start; the last one
    # unlinked its own.
    ours = {str(pid) for pid in pids}
    leftovers = [p.name for p in SHM_DIR.glob("streamer-*") if p.name.split("-")[1] in ours]
    assert leftovers == []


@pytest.mark.timeout(900)
@pytest.mark.parametrize("delivery", ["at-least-once", "exactly-once"])
async def test_service_killed_twice_loses_nothing(
    kafka_bootstrap: str,
    kafka_options: dict[str, str],
    unique_name: str,
    new_topics,
    samples: list[corpus.Sample],
    tmp_path: Path,
    delivery: str,
) -> None:
    await _kill_service_repeatedly(
        kafka_bootstrap,
        kafka_options,
        unique_name,
        new_topics,
        samples[:120],
        2,
        delivery,
        tmp_path,
    )


@pytest.mark.chaos
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("delivery", ["at-least-once", "exactly-once"])
async def test_service_killed_five_times_loses_nothing(
    kafka_bootstrap: str,
    kafka_options: dict[str, str],
    unique_name: str,
    new_topics,
    tmp_path: Path,
    delivery: str,
) -> None:
    images = list(corpus.generate(400, seed=3))
    await _kill_service_repeatedly(
        kafka_bootstrap, kafka_options, unique_name, new_topics, images, 5, delivery, tmp_path
    )
