"""Credentials stay out of worker environments and off the command line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from streamer import cli, logs
from streamer.config import Settings
from streamer.vision.decode import DecodeLimits
from streamer.workers import decode_worker
from streamer.workers.environment import environment_without_credentials, is_credential_variable
from streamer.workers.process import WorkerProcess
from streamer.workers.shm import SlotPool

pytestmark = pytest.mark.timeout(120)

SECRET = "hunter2-secret"
# Each holds a credential; the last two only by their names' markers, one in lower case
# (pydantic-settings reads STREAMER_* names in any case).
CREDENTIALS = {
    "STREAMER_SASL_PASSWORD": SECRET,
    "STREAMER_SASL_PASSWORD_FILE": "/run/secrets/kafka-password",
    "STREAMER_SASL_USERNAME": "svc-streamer",
    "STREAMER_SSL_KEYFILE": "/run/secrets/client.key",
    "STREAMER_OAUTH_TOKEN": "token-value",
    "streamer_api_secret": "secret-value",
}


def environ_of(pid: int) -> dict[str, str]:
    entries = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    pairs = (entry.decode(errors="replace").partition("=") for entry in entries if entry)
    return {name: value for name, _, value in pairs}


@pytest.fixture
def credentials(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv(logs.FORMAT_ENV, "json")  # what workers do read
    monkeypatch.setenv("STREAMER_TOP_K", "3")  # a setting, not a credential
    return CREDENTIALS


@pytest.fixture
def no_streamer_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in Settings.model_fields:
        monkeypatch.delenv(f"STREAMER_{name.upper()}", raising=False)


@pytest.mark.parametrize(
    ("name", "credential"),
    [
        *((name, True) for name in CREDENTIALS),
        ("STREAMER_LOG_FORMAT", False),
        ("STREAMER_SSL_CAFILE", False),
        ("STREAMER_BOOTSTRAP_SERVERS", False),
        ("PGPASSWORD", False),  # not the service's: left alone
    ],
)
def test_credential_variables_are_recognised_by_name(name: str, credential: bool) -> None:
    assert is_credential_variable(name) is credential


async def test_a_spawned_worker_gets_no_credentials_and_the_owner_keeps_them(
    credentials: dict[str, str],
) -> None:
    with SlotPool(slots=1, payload_bytes=64 * 1024) as slots:
        worker = WorkerProcess("decode", 0, decode_worker.main, (slots.layout, DecodeLimits()))
        await worker.start(60)
        try:
            assert worker.pid is not None
            child = environ_of(worker.pid)
        finally:
            await worker.stop()

    assert not set(credentials) & set(child), sorted(set(credentials) & set(child))
    assert SECRET not in "\0".join(f"{k}={v}" for k, v in child.items())
    # Everything else is inherited as before: the log format workers read, other settings.
    assert child[logs.FORMAT_ENV] == "json" and child["STREAMER_TOP_K"] == "3"
    assert child["PATH"] == os.environ["PATH"]
    # The owner's environment is whole again once the worker is started.
    assert {name: os.environ.get(name) for name in credentials} == credentials


def test_the_environment_is_restored_when_a_start_fails(credentials: dict[str, str]) -> None:
    with pytest.raises(OSError), environment_without_credentials():
        assert not set(credentials) & set(os.environ)
        raise OSError("fork failed")
    assert {name: os.environ.get(name) for name in credentials} == credentials


def test_the_resource_tracker_starts_without_credentials(credentials: dict[str, str]) -> None:
    # A fresh interpreter: the tracker of this test process may already be running.
    program = (
        "import os, time\n"
        "from multiprocessing import resource_tracker\n"
        "from streamer.workers.environment import start_resource_tracker\n"
        "start_resource_tracker()\n"
        "pid = resource_tracker._resource_tracker._pid\n"
        # Until the tracker has exec'd: before that, the forked child's cmdline is this
        # program's (which names resource_tracker too) and its environ is ours.
        "deadline = time.monotonic() + 30\n"
        "while b'resource_tracker import main' not in open(f'/proc/{pid}/cmdline', 'rb').read():\n"
        "    assert time.monotonic() < deadline\n"
        "    time.sleep(0.01)\n"
        "print(pid, os.environ['STREAMER_SASL_PASSWORD'])\n"
        "print(open(f'/proc/{pid}/environ', 'rb').read().decode(errors='replace'))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=60, check=True
    )
    first, tracker_environ = done.stdout.split("\n", 1)
    assert first.split()[1] == SECRET  # the parent still has it
    assert "STREAMER_TOP_K=3" in tracker_environ  # the tracker's environment was read
    assert SECRET not in tracker_environ and "STREAMER_SASL" not in tracker_environ


@pytest.mark.usefixtures("no_streamer_environment")
@pytest.mark.parametrize("flag", [["--sasl-password", SECRET], [f"--sasl-password={SECRET}"]])
def test_a_password_on_the_command_line_is_refused_and_the_file_flag_works(
    flag: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    served: list[Settings] = []

    async def fake_serve(settings: Settings) -> int:
        served.append(settings)
        return 0

    monkeypatch.setattr(cli, "_serve", fake_serve)
    assert cli.main(["run", *flag]) == 2
    assert not served
    err = capsys.readouterr().err
    assert SECRET not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, lines
    assert "--sasl-password is refused" in lines[0]
    assert "STREAMER_SASL_PASSWORD" in lines[0] and "--sasl-password-file" in lines[0]

    # The route the message names: the same password, read from a file.
    secret_file = tmp_path / "password"
    secret_file.write_text(SECRET + "\n")
    args = cli.build_parser().parse_args(["run", "--sasl-password-file", str(secret_file)])
    secret = cli.settings_from_args(args).sasl_secret
    assert secret is not None and secret.get_secret_value() == SECRET


@pytest.mark.usefixtures("no_streamer_environment")
def test_run_help_offers_the_password_file_not_the_password_flag(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        cli.main(["run", "--help"])
    text = capsys.readouterr().out
    assert "--sasl-password-file" in text
    assert "--sasl-password " not in text and "--sasl-password\n" not in text
