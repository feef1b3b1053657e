"""Interoperability: images published with kcat are classified, and kcat reads the predictions."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest

from streamer import corpus
from tests.integration.helpers import read_exactly, running_service, service_settings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


async def kcat(*args: str) -> str:
    """Run kcat without blocking the event loop (the service runs in this loop)."""
    process = await asyncio.create_subprocess_exec(
        "kcat", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, stderr.decode()
    return stdout.decode()


@pytest.mark.skipif(shutil.which("kcat") is None, reason="kcat is installed by make test")
async def test_kcat_produces_images_and_reads_predictions(
    kafka_bootstrap: str,
    kafka_options: dict[str, str],
    unique_name: str,
    new_topics,
    samples: list[corpus.Sample],
    tmp_path: Path,
) -> None:
    settings = service_settings(kafka_bootstrap, unique_name)
    await new_topics("in", "out", "dlq", partitions=1)
    files = []
    for sample in samples[:6]:
        path = tmp_path / sample.name
        path.write_bytes(sample.data)
        files.append(str(path))

    async with running_service(settings):
        # kcat -P with file arguments sends each file as one message.
        await kcat("-P", "-b", kafka_bootstrap, "-t", settings.input_topic, *files)
        await read_exactly(kafka_options, settings.output_topic, len(files))

    output = await kcat(
        "-C",
        "-b",
        kafka_bootstrap,
        "-t",
        settings.output_topic,
        "-o",
        "beginning",
        "-e",
        "-q",
        "-f",
        "%o %s\n",
    )
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == len(files)
    offsets = set()
    for line in lines:
        _, value = line.split(" ", 1)
        prediction = json.loads(value)
        assert len(prediction["top_k"]) == 5
        offsets.add(prediction["source"]["offset"])
    assert offsets == set(range(len(files)))
