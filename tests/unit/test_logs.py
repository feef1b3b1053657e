"""Logging setup: the JSON-lines format and how spawned workers pick their format."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from streamer import logs

pytestmark = pytest.mark.timeout(10)


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """configure() replaces the root handlers; put pytest's back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def emit_records() -> None:
    log = logging.getLogger("streamer.test")
    log.info("partition=3 offset=%d fetched", 17)
    try:
        raise ValueError("bad image")
    except ValueError:
        log.exception("record failed topic=%s", "images")


def test_json_format_writes_one_object_per_line(capsys: pytest.CaptureFixture[str]) -> None:
    logs.configure("INFO", "json")
    before = datetime.now(UTC)
    emit_records()
    lines = capsys.readouterr().err.splitlines()

    assert len(lines) == 2  # the traceback stays inside its line
    first, second = (json.loads(line) for line in lines)
    assert first["message"] == "partition=3 offset=17 fetched"
    assert first["level"] == "INFO"
    assert first["logger"] == "streamer.test"
    assert first["process"] == "MainProcess"
    assert "exception" not in first
    logged_at = datetime.fromisoformat(first["time"].replace("Z", "+00:00"))
    assert logged_at.utcoffset() == timedelta(0)
    assert abs(logged_at - before) < timedelta(seconds=5)

    assert second["level"] == "ERROR"
    assert second["message"] == "record failed topic=images"
    assert second["exception"].startswith("Traceback")
    assert "ValueError: bad image" in second["exception"]


def test_text_format_keeps_the_message_readable(capsys: pytest.CaptureFixture[str]) -> None:
    logs.configure("INFO", "text")
    logging.getLogger("streamer.test").info("partition=3 fetched")
    line = capsys.readouterr().err.strip()
    assert line.endswith("INFO MainProcess streamer.test partition=3 fetched")


@pytest.mark.parametrize(("inherited", "is_json"), [("json", True), ("text", False), (None, False)])
def test_without_a_format_the_environment_decides(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    inherited: str | None,
    is_json: bool,
) -> None:
    """Spawned workers call configure(level) and follow the owner's STREAMER_LOG_FORMAT."""
    if inherited is None:
        monkeypatch.delenv(logs.FORMAT_ENV, raising=False)
    else:
        monkeypatch.setenv(logs.FORMAT_ENV, inherited)
    logs.configure(logging.INFO)
    logging.getLogger("streamer.worker").info("ready")
    line = capsys.readouterr().err.strip()
    assert line.startswith("{") is is_json
    if is_json:
        assert json.loads(line)["message"] == "ready"


def test_level_filters_records(capsys: pytest.CaptureFixture[str]) -> None:
    logs.configure("WARNING", "json")
    logging.getLogger("streamer.test").info("hidden")
    logging.getLogger("streamer.test").warning("shown")
    lines = capsys.readouterr().err.splitlines()
    assert [json.loads(line)["message"] for line in lines] == ["shown"]
