"""Interoperability: images published with kcat (any codec) are classified, and kcat reads
the predictions."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from streamer import corpus
from streamer.kafka import compat
from streamer.schemas import DLQ_MESSAGE, DLQ_REASON, DLQ_SOURCE_OFFSET
from tests.integration.helpers import (
    kcat,
    read_all,
    read_exactly,
    running_service,
    service_settings,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


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


CODECS = ["none", "gzip", "snappy", "lz4", "zstd"]


@pytest.mark.skipif(shutil.which("kcat") is None, reason="kcat is installed by make test")
async def test_kcat_batches_of_every_codec_are_all_predicted(
    kafka_bootstrap: str,
    kafka_options: dict[str, str],
    unique_name: str,
    new_topics,
    samples: list[corpus.Sample],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each kcat call sends its files as one batch compressed with its codec: every
    photo of every codec is predicted, none is dead-lettered. The photos are stored PNGs
    (no deflate), which compress: librdkafka sends a batch that would not shrink as is."""
    settings = service_settings(kafka_bootstrap, unique_name)
    await new_topics("in", "out", "dlq", partitions=1)
    per_codec = 4
    files = []
    for i, sample in enumerate(samples[: per_codec * len(CODECS)]):
        path = tmp_path / f"photo-{i}.png"
        with Image.open(io.BytesIO(sample.data)) as image:
            image.convert("RGB").resize((256, 256)).save(path, "PNG", compress_level=0)
        files.append(str(path))
    inflated: list[int] = []
    inflate = compat.inflate

    def counted(codec: int, *args: Any, **kwargs: Any) -> memoryview:
        inflated.append(codec)
        return inflate(codec, *args, **kwargs)

    monkeypatch.setattr(compat, "inflate", counted)

    async with running_service(settings):
        for i, codec in enumerate(CODECS):
            batch = files[i * per_codec : (i + 1) * per_codec]
            await kcat("-P", "-b", kafka_bootstrap, "-t", settings.input_topic, "-z", codec, *batch)
        predictions = await read_exactly(kafka_options, settings.output_topic, len(files), 120)

    offsets = sorted(json.loads(r.value)["source"]["offset"] for r in predictions)
    assert offsets == list(range(len(files))), "every photo of every codec is predicted"
    assert await read_all(kafka_options, settings.dlq_topic) == []
    codecs = {compat.GZIP: "gzip", compat.SNAPPY: "snappy", compat.LZ4: "lz4", compat.ZSTD: "zstd"}
    assert {codecs[c] for c in inflated} == set(CODECS) - {"none"}, "kcat compressed each batch"


@pytest.mark.skipif(shutil.which("kcat") is None, reason="kcat is installed by make test")
async def test_a_batch_over_the_inflation_cap_is_dead_lettered_and_the_stream_goes_on(
    kafka_bootstrap: str,
    kafka_options: dict[str, str],
    unique_name: str,
    new_topics,
    samples: list[corpus.Sample],
    tmp_path: Path,
) -> None:
    """3 MiB of zeros gzipped into a few KB, against a 1 MiB cap: an undecodable-record
    dead letter, and the photo after it is predicted."""
    settings = service_settings(kafka_bootstrap, unique_name, max_batch_decompressed_bytes=1 << 20)
    await new_topics("in", "out", "dlq", partitions=1)
    bomb, photo = tmp_path / "bomb", tmp_path / samples[0].name
    bomb.write_bytes(bytes(3 << 20))
    photo.write_bytes(samples[0].data)

    async with running_service(settings):
        topic = settings.input_topic
        await kcat(
            "-P", "-b", kafka_bootstrap, "-t", topic, "-z", "gzip",
            "-X", "message.max.bytes=8000000", str(bomb),
        )  # fmt: skip
        await kcat("-P", "-b", kafka_bootstrap, "-t", topic, str(photo))
        [prediction] = await read_exactly(kafka_options, settings.output_topic, 1, 120)
        [dead] = await read_exactly(kafka_options, settings.dlq_topic, 1, 120)

    assert json.loads(prediction.value)["source"]["offset"] == 1
    headers = dict(dead.headers)
    assert headers[DLQ_SOURCE_OFFSET] == b"0"
    assert headers[DLQ_REASON] == b"undecodable-record"
    assert b"max_batch_decompressed_bytes" in headers[DLQ_MESSAGE]
