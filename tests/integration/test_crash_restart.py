"""SIGKILL the whole service mid-stream and restart it: nothing is lost."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from streamer import corpus
from streamer.workers.shm import SHM_DIR
from tests.integration.helpers import (
    ServiceProcess,
    output_ids,
    produce,
    read_all,
    service_settings,
    wait_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]


async def test_sigkill_mid_stream_then_restart_loses_nothing(
    kafka_bootstrap: str,
    kafka_options: dict[str, str],
    unique_name: str,
    new_topics,
    samples: list[corpus.Sample],
    tmp_path: Path,
) -> None:
    settings = service_settings(
        kafka_bootstrap, unique_name, max_batch_size=8, commit_interval_ms=100
    )
    await new_topics("in", "out", "dlq", partitions=3)
    images = samples[:120]
    await produce(
        kafka_options,
        settings.input_topic,
        [(s.name.encode(), s.data, [("ce_id", s.name.encode())]) for s in images],
    )
    expected = {s.name for s in images}

    service = ServiceProcess(settings, tmp_path / "service.log")

    async def predicted() -> set[str]:
        service.check_alive()
        return await output_ids(kafka_options, settings.output_topic)

    async def at_least_ten() -> bool:
        return len(await predicted()) >= 10

    async def all_predicted() -> bool:
        return expected <= await predicted()

    service.start()
    try:
        # Kill once some, but not all, predictions are out.
        await wait_for(at_least_ten, 300, "the first predictions")
        killed_pid = service.process.pid if service.process else -1
        service.kill()
        seen_before_restart = await output_ids(kafka_options, settings.output_topic)
        assert 0 < len(seen_before_restart) < len(expected), "the kill should land mid-stream"

        service.start()
        await wait_for(all_predicted, 600, "every input to have an output")
        assert service.terminate() == 0, service.log()
    finally:
        if service.process and service.process.poll() is None:
            service.kill()

    outputs = await read_all(kafka_options, settings.output_topic)
    ids = [json.loads(r.value)["id"] for r in outputs]
    assert set(ids) == expected  # nothing lost, nothing invented
    duplicates = len(ids) - len(set(ids))
    print(f"outputs={len(ids)} inputs={len(expected)} duplicates={duplicates}")
    # The killed instance's segments were swept by the restart; the second one unlinked its own.
    leftovers = [
        p.name
        for p in SHM_DIR.glob("streamer-*")
        if p.name.split("-")[1] in (str(killed_pid), str(service.process.pid))
    ]
    assert leftovers == []
