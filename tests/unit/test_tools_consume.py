"""How ``streamer consume`` prints a record, and when the tools show a progress bar."""

from __future__ import annotations

import io
import json

import pytest
from aiokafka import ConsumerRecord

from streamer.tools.common import progress_bar
from streamer.tools.consume import format_json, format_table_row

pytestmark = pytest.mark.timeout(30)

# The default prediction: no batch_size and no timings (they are optional).
PREDICTION = {
    "id": "5f0c-cat",
    "source": {"topic": "images", "partition": 0, "offset": 7, "timestamp": 1},
    "model": {"name": "resnet18", "weights": "imagenet", "device": "cpu", "precision": "fp32"},
    "top_k": [
        {"index": 281, "label": "tabby", "score": 0.61},
        {"index": 282, "label": "tiger cat", "score": 0.22},
        {"index": 285, "label": "Egyptian cat", "score": 0.09},
        {"index": 1, "label": "goldfish", "score": 0.01},
    ],
}


def record(
    value: bytes, key: bytes | None, headers: list[tuple[str, bytes]]
) -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord(
        topic="predictions",
        partition=2,
        offset=41,
        timestamp=1_700_000_000_000,
        timestamp_type=0,
        key=key,
        value=value,
        checksum=None,
        serialized_key_size=len(key or b""),
        serialized_value_size=len(value),
        headers=headers,
    )


def test_a_table_row_shows_id_key_and_top_3_without_batch_size_or_timings() -> None:
    row = format_table_row(record(json.dumps(PREDICTION).encode(), b"cat.jpg", []))
    assert row.split()[:2] == ["5f0c-cat", "cat.jpg"]
    assert row.endswith("tabby 0.610, tiger cat 0.220, Egyptian cat 0.090")


def test_a_dead_letter_row_shows_its_key_and_reason() -> None:
    row = format_table_row(
        record(b"GIF89a", b"anim.gif", [("streamer-error-reason", b"unsupported-format")])
    )
    assert row.split()[:2] == ["predictions/2/41", "anim.gif"]
    assert row.endswith("dead letter: unsupported-format")


def test_json_carries_key_headers_and_the_prediction() -> None:
    headers = [("content-type", b"application/json"), ("ce_id", b"5f0c-cat")]
    document = json.loads(format_json(record(json.dumps(PREDICTION).encode(), b"cat.jpg", headers)))
    assert document["key"] == "cat.jpg"
    assert document["headers"] == {"content-type": "application/json", "ce_id": "5f0c-cat"}
    assert document["value"] == PREDICTION
    assert (document["topic"], document["partition"], document["offset"]) == ("predictions", 2, 41)


def test_json_of_a_dead_letter_has_its_size_instead_of_the_image() -> None:
    document = json.loads(
        format_json(record(b"GIF89a", None, [("streamer-error-reason", b"unsupported-format")]))
    )
    assert document["key"] is None and document["value"] is None
    assert document["value_bytes"] == 6
    assert document["headers"] == {"streamer-error-reason": "unsupported-format"}


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_progress_bar_is_drawn_on_a_terminal_only() -> None:
    for stream, quiet, drawn in (
        (Terminal(), False, True),
        (Terminal(), True, False),
        (io.StringIO(), False, False),  # a CI log or a pipe: no carriage returns
    ):
        with progress_bar(3, "image", quiet=quiet, stream=stream) as bar:
            bar.update(3)
        assert ("\r" in stream.getvalue()) is drawn, (type(stream).__name__, quiet)
