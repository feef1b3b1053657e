"""The benchmark's service child gets its settings, secrets included, through the environment.

A child started by ``ServiceProcess`` builds its settings from ``STREAMER_*`` variables
alone, so every setting must come back from ``service_env`` as it went in; a secret
must go in as its value, never as its mask and never on the command line.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streamer.bench.service import ChildProcess, ServiceProcess, service_env
from streamer.config import Settings

pytestmark = pytest.mark.timeout(60)

SECRET = "hunter2 \u00e9;'$x"
SASL = {"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "PLAIN", "sasl_username": "u"}


@pytest.fixture(autouse=True)
def no_streamer_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in os.environ:
        if name.startswith("STREAMER_"):
            monkeypatch.delenv(name)


def read_back(env: dict[str, str]) -> Settings:
    """The settings a child started with ``env`` reads (no flags: the environment only)."""
    with mock.patch.dict(os.environ, env, clear=True):
        return Settings()


def test_the_child_environment_holds_the_password_itself_not_its_mask() -> None:
    settings = Settings(**SASL, sasl_password=SECRET)

    env = service_env(settings)

    assert env["STREAMER_SASL_PASSWORD"] == SECRET
    secret = read_back(env).sasl_secret
    assert secret is not None and secret.get_secret_value() == SECRET


def test_the_service_child_reads_the_password_from_its_environment_not_its_command_line(
    tmp_path: Path,
) -> None:
    service = ServiceProcess(Settings(**SASL, sasl_password=SECRET), tmp_path / "service.log")
    assert not [arg for arg in service.argv if SECRET in arg]

    # A child with the service's environment, standing in for ``python -m streamer run``.
    echo = "import os, sys; sys.stdout.write(os.environ['STREAMER_SASL_PASSWORD'])"
    child = ChildProcess([sys.executable, "-c", echo], service.env, tmp_path / "child.log")
    child.start()
    assert child.process is not None
    assert child.process.wait(timeout=30) == 0

    assert child.log_path.read_text(encoding="utf-8") == SECRET


def test_a_password_file_reaches_the_child_as_its_path(tmp_path: Path) -> None:
    secret_file = tmp_path / "password"
    secret_file.write_text(SECRET + "\n", encoding="utf-8")
    settings = Settings(**SASL, sasl_password_file=str(secret_file))

    env = service_env(settings)

    assert "STREAMER_SASL_PASSWORD" not in env  # the child reads the file, as in production
    assert env["STREAMER_SASL_PASSWORD_FILE"] == str(secret_file)
    secret = read_back(env).sasl_secret
    assert secret is not None and secret.get_secret_value() == SECRET


# What an environment variable can hold: any text but NUL and lone surrogates.
env_text = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), min_size=1
)


@given(
    password=env_text,
    username=env_text,
    client_id=env_text,
    include_timings=st.booleans(),
    max_batch_delay_ms=st.floats(min_value=0.0, max_value=1e6, allow_nan=False),
    allowed_formats=st.lists(st.sampled_from(["JPEG", "PNG", "WEBP"]), min_size=1, unique=True),
)
def test_every_setting_comes_back_from_the_child_environment_as_it_went_in(
    password: str,
    username: str,
    client_id: str,
    include_timings: bool,
    max_batch_delay_ms: float,
    allowed_formats: list[str],
) -> None:
    settings = Settings(
        security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username=username,
        sasl_password=password,
        client_id=client_id,
        include_timings=include_timings,
        max_batch_delay_ms=max_batch_delay_ms,
        allowed_formats=tuple(allowed_formats),
    )

    child = read_back(service_env(settings))

    # SecretStr compares by value, so this covers the password too.
    assert child.model_dump() == settings.model_dump()
    assert child.sasl_secret == settings.sasl_secret
