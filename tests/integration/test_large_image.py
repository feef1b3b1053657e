"""A phone-sized photo (over 5 MB) goes through ``produce`` -> service -> prediction.

The local broker used to keep Kafka's 1 MiB ``message.max.bytes`` while the service
accepts 8 MiB, so such a file failed in ``produce`` with MessageSizeTooLargeError.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from streamer.tools.produce import produce_files
from tests.integration.helpers import read_exactly, running_service, service_settings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


async def test_a_5_mb_jpeg_is_predicted(
    kafka_bootstrap: str,
    kafka_options: dict[str, str],
    unique_name: str,
    new_topics,
    tmp_path: Path,
) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (2200, 2200, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=95)
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(buffer.getvalue())
    assert photo.stat().st_size > 5_000_000

    settings = service_settings(kafka_bootstrap, unique_name)
    await new_topics("in", "out", "dlq", partitions=1)
    async with running_service(settings):
        await produce_files(kafka_options, settings.input_topic, [photo], progress=False)
        [output] = await read_exactly(kafka_options, settings.output_topic, 1, timeout_s=120)
    prediction = json.loads(output.value)
    assert output.key == b"photo.jpg" and len(prediction["top_k"]) == 5
