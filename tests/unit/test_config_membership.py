"""Static membership and credentials-from-a-file settings, and how they reach the clients."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from streamer.cli import build_parser, describe_invalid, settings_from_args
from streamer.config import Settings
from streamer.kafka import intake as intake_module
from streamer.kafka.clients import connection_options
from streamer.metrics import Metrics

pytestmark = pytest.mark.timeout(30)

SASL = {"security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512", "sasl_username": "u"}


# ------------------------------------------------------------ static membership


def test_dynamic_membership_and_aiokafkas_session_timeout_by_default() -> None:
    settings = Settings()
    assert settings.group_instance_id is None
    assert settings.session_timeout_ms == 10_000


def test_group_instance_id_auto_is_the_host_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMER_GROUP_INSTANCE_ID", "auto")
    monkeypatch.setenv("STREAMER_SESSION_TIMEOUT_MS", "45000")
    settings = Settings()
    assert settings.group_instance_id == socket.gethostname()
    assert settings.session_timeout_ms == 45_000


def test_group_instance_id_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMER_GROUP_INSTANCE_ID", "from-env")
    args = build_parser().parse_args(["run", "--group-instance-id", "streamer-0"])
    assert settings_from_args(args).group_instance_id == "streamer-0"


@pytest.mark.parametrize("bad", [{"group_instance_id": "  "}, {"session_timeout_ms": 500}])
def test_invalid_membership_settings_are_rejected(bad: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        Settings(**bad)


class RecordingConsumer:
    """Stands in for AIOKafkaConsumer: keeps the keyword arguments it was made with."""

    made: list[dict[str, Any]] = []

    def __init__(self, **kwargs: Any) -> None:
        RecordingConsumer.made.append(kwargs)

    def subscribe(self, topics: list[str], listener: Any) -> None:
        pass

    async def start(self) -> None:
        pass


@pytest.mark.parametrize("instance_id", [None, "streamer-1"])
async def test_the_consumer_gets_the_instance_id_and_session_timeout(
    monkeypatch: pytest.MonkeyPatch, instance_id: str | None
) -> None:
    monkeypatch.setattr(intake_module, "AIOKafkaConsumer", RecordingConsumer)
    RecordingConsumer.made.clear()
    settings = Settings(group_instance_id=instance_id, session_timeout_ms=30_000)
    await intake_module.Intake(settings, Metrics()).start(listener=None)  # type: ignore[arg-type]
    (kwargs,) = RecordingConsumer.made
    assert kwargs["group_instance_id"] == instance_id
    assert kwargs["session_timeout_ms"] == 30_000
    assert kwargs["heartbeat_interval_ms"] < kwargs["session_timeout_ms"] / 2


# ------------------------------------------------------------ credentials from a file


def test_password_is_read_from_the_file_without_its_newline(tmp_path: Path) -> None:
    secret = tmp_path / "password"
    secret.write_text("s3cret \n")
    settings = Settings(**SASL, sasl_password_file=str(secret))
    assert settings.sasl_password is None
    assert settings.sasl_secret is not None
    assert settings.sasl_secret.get_secret_value() == "s3cret "  # only the newline goes
    assert "s3cret" not in repr(settings) and "s3cret" not in str(settings.model_dump())
    assert connection_options(settings)["sasl_plain_password"] == "s3cret "


def test_password_file_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    secret = tmp_path / "password"
    secret.write_text("from-file\r\n")
    monkeypatch.setenv("STREAMER_SASL_PASSWORD_FILE", str(secret))
    settings = Settings(**SASL)
    assert connection_options(settings)["sasl_plain_password"] == "from-file"


def test_the_password_setting_still_works() -> None:
    settings = Settings(**SASL, sasl_password="plain")
    assert connection_options(settings)["sasl_plain_password"] == "plain"


def test_password_and_password_file_together_are_an_error(tmp_path: Path) -> None:
    secret = tmp_path / "password"
    secret.write_text("one")
    with pytest.raises(ValidationError) as caught:
        Settings(**SASL, sasl_password="hunter2", sasl_password_file=str(secret))
    message = str(caught.value)
    assert "not both" in message
    assert "hunter2" not in message  # errors never echo their input


@pytest.mark.parametrize("problem", ["missing", "folder", "empty", "not-utf8"])
def test_a_bad_password_file_is_a_config_error_naming_the_setting(
    tmp_path: Path, problem: str
) -> None:
    path = tmp_path / "password"
    if problem == "folder":
        path.mkdir()
    elif problem == "empty":
        path.write_text("\n")
    elif problem == "not-utf8":
        path.write_bytes(b"top-secret\xff\xfe")
    with pytest.raises(ValidationError) as caught:
        Settings(**SASL, sasl_password_file=str(path))
    lines = describe_invalid(caught.value)
    assert len(lines) == 1 and "sasl_password_file" in lines[0], lines
    assert "top-secret" not in str(caught.value)
