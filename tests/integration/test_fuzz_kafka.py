"""No record stops the service: seeded hostile records from librdkafka and kcat, every codec,
exactly-once mode; every record gets exactly one answer and every plain photo a prediction.

``make test`` runs one seed of 240 records; ``make fuzz-kafka`` runs the long form
(``STREAMER_FUZZ_KAFKA_SEEDS``, ``STREAMER_FUZZ_KAFKA_RECORDS``; figures in
docs/RELIABILITY.md). ``STREAMER_FUZZ_KAFKA_REPORT`` names a file that gets one JSON line
per seed.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import time
from pathlib import Path

import pytest
from aiokafka.errors import KafkaError

from streamer import corpus
from streamer.tools.admin import create_topics
from tests.integration.helpers import ServiceProcess, committed_and_end, service_settings, wait_for
from tests.integration.kafka_fuzz import generate, seeds_and_count, send_async, tally

SEEDS, COUNT = seeds_and_count()
pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(300 + len(SEEDS) * (120 + COUNT // 5)),
    pytest.mark.skipif(shutil.which("kcat") is None, reason="kcat is installed by make test"),
]


def _append_line(path: Path, line: str) -> None:
    with path.open("a") as file:
        file.write(line + "\n")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("seed", SEEDS)
async def test_hostile_records_from_other_clients_each_get_exactly_one_answer(
    seed: int,
    kafka_bootstrap: str,
    kafka_options: dict[str, str],
    unique_name: str,
    samples: list[corpus.Sample],
    tmp_path: Path,
) -> None:
    prefix = f"{unique_name}-{seed}"
    settings = service_settings(
        kafka_bootstrap, prefix, delivery="exactly-once", metrics_port=free_port()
    )
    await create_topics(kafka_options, [settings.input_topic], 2)
    await create_topics(kafka_options, [settings.output_topic, settings.dlq_topic], 1)
    records = generate(seed, COUNT, [s.data for s in samples])
    started = time.monotonic()
    await send_async(kafka_bootstrap, settings.input_topic, records)

    service = ServiceProcess(settings, tmp_path / "service.log")
    service.start()
    try:

        async def all_committed() -> bool:
            service.check_alive()  # a service that stopped fails here, with its log
            try:
                committed, end = await committed_and_end(
                    kafka_options, settings.group_id, settings.input_topic
                )
            except KafkaError:  # the group has no coordinator before the service joins
                return False
            return bool(end) and all(committed.get(p) == o for p, o in end.items())

        await wait_for(all_committed, 120 + COUNT // 5, "every input offset committed", 2.0)
    finally:
        exit_code = service.terminate()
    result = await tally(kafka_options, settings.output_topic, settings.dlq_topic, records)
    figures = {
        "seed": seed,
        **result.as_dict(),
        "service_exit_code": exit_code,
        "service_restarts": 0,  # one process from start to end, or check_alive failed above
        "seconds": round(time.monotonic() - started, 1),
    }
    print(json.dumps(figures))
    if report := os.environ.get("STREAMER_FUZZ_KAFKA_REPORT"):
        await asyncio.to_thread(_append_line, Path(report), json.dumps(figures))
    assert exit_code == 0, service.log()[-3000:]
    assert result.answers == result.records, figures
    assert (result.lost, result.duplicated, result.foreign_answers) == (0, 0, 0), figures
    assert result.plain_photos > 0 and result.plain_photos_not_predicted == 0, figures
    assert "internal-error" not in result.reasons, (figures, service.log()[-5000:])
