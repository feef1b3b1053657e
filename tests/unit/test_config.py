from __future__ import annotations

import pytest
from pydantic import ValidationError

from streamer.cli import build_parser, settings_from_args
from streamer.config import Settings


def test_environment_variables_use_the_streamer_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMER_MAX_BATCH_SIZE", "48")
    monkeypatch.setenv("STREAMER_INPUT_TOPIC", "photos")
    settings = Settings()
    assert settings.max_batch_size == 48
    assert settings.input_topic == "photos"


def test_flags_win_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMER_GROUP_ID", "from-env")
    monkeypatch.setenv("STREAMER_TOP_K", "3")
    args = build_parser().parse_args(
        ["run", "--group-id", "from-flag", "--allowed-formats", "jpeg, png"]
    )
    settings = settings_from_args(args)
    assert settings.group_id == "from-flag"
    assert settings.top_k == 3
    assert settings.allowed_formats == ("JPEG", "PNG")


def test_settings_are_frozen_and_secrets_hidden() -> None:
    settings = Settings(
        security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username="u",
        sasl_password="hunter2",
    )
    with pytest.raises(ValidationError):
        settings.top_k = 3  # type: ignore[misc]
    assert "hunter2" not in repr(settings)


@pytest.mark.parametrize(
    "bad",
    [
        {"max_batch_size": 0},
        {"max_batch_size": 64, "max_in_flight": 32},
        {"input_topic": "same", "output_topic": "same"},
        {"device": "tpu"},
        {"sasl_mechanism": "PLAIN"},  # SASL without a SASL protocol
        {"unknown_option": 1},
    ],
)
def test_invalid_settings_are_rejected(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        Settings(**bad)


def test_shared_memory_bound_follows_the_documented_formula() -> None:
    settings = Settings(max_in_flight=10, max_batch_size=8, max_payload_bytes=2048)
    assert settings.shared_memory_bytes == 10 * (2048 + 3 * 224 * 224)


def test_every_setting_is_described_for_the_help() -> None:
    undocumented = [name for name, f in Settings.model_fields.items() if not f.description]
    assert undocumented == []
