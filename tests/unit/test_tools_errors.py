"""The tools fail in one line with the likely fix: no traceback, no "Unclosed" client warning.

The command-line cases run ``python -m streamer`` as a child process, which is
the only honest check that nothing else reaches stderr: aiokafka reports an
unclosed client from its finaliser, after the tool has returned.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from streamer import errors
from streamer.tools import bench, replay, samples
from streamer.tools.common import connected
from streamer.tools.errors import BrokerUnreachable

pytestmark = pytest.mark.timeout(60)

NOWHERE = "127.0.0.1:1"  # nothing listens on port 1: connections are refused at once


def streamer(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-W", "always::ResourceWarning", "-m", "streamer", *argv],
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
    )


def one_line_error(result: subprocess.CompletedProcess[str], command: str) -> str:
    """The single stderr line of a failed run, checked to be a plain message."""
    assert result.returncode != 0, result.stdout
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr and "Unclosed" not in result.stderr
    assert lines[0].startswith(f"streamer {command}: ")
    return lines[0]


@pytest.mark.parametrize(
    "argv",
    [["produce", "IMAGE"], ["consume"], ["replay"], ["create-topics"]],
    ids=lambda argv: argv[0],
)
def test_an_unreachable_broker_is_named_with_the_compose_address(
    argv: list[str], tmp_path: Path
) -> None:
    image = tmp_path / "cat.jpg"
    image.write_bytes(b"\xff\xd8 not really a jpeg")
    argv = [str(image) if a == "IMAGE" else a for a in argv]
    result = streamer(*argv, "--bootstrap-servers", NOWHERE)
    line = one_line_error(result, argv[0])
    assert f"cannot reach Kafka at {NOWHERE}" in line
    assert "--bootstrap-servers 127.0.0.1:9094" in line
    assert "STREAMER_BOOTSTRAP_SERVERS" in line and "make kafka-up" in line
    assert result.returncode == 1


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-folder"
    result = streamer("produce", str(missing), "--bootstrap-servers", NOWHERE)
    assert one_line_error(result, "produce") == (
        f"streamer produce: no such file or folder: {missing}"
    )


def test_an_unknown_replay_reason_is_refused_before_connecting() -> None:
    # Refused before any client exists: with an unreachable broker, a check made
    # after connecting would report the broker instead.
    result = streamer("replay", "--reason", "unsuported-format", "--bootstrap-servers", NOWHERE)
    line = one_line_error(result, "replay")
    assert "unknown --reason 'unsuported-format'" in line
    assert f"valid reasons: {', '.join(errors.DEAD_LETTER_REASONS)}" in line
    assert result.returncode == 2


def run_tool(module: object, argv: list[str]) -> int:
    """Parse ``argv`` with the tool's own ``add_parser`` hook and run it in this process."""
    parser = argparse.ArgumentParser(prog="streamer")
    module.add_parser(parser.add_subparsers(dest="command"))  # type: ignore[attr-defined]
    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


def test_replay_reads_the_valid_reasons_from_the_service(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A reason the service adds later is accepted without touching the tool."""
    monkeypatch.setattr(errors, "DEAD_LETTER_REASONS", (*errors.DEAD_LETTER_REASONS, "new-one"))
    assert run_tool(replay, ["replay", "--reason", "new-one", "--bootstrap-servers", NOWHERE]) == 1
    assert "cannot reach Kafka" in capsys.readouterr().err  # got past the reason check


@pytest.mark.parametrize(
    ("module", "argv", "absent", "extra"),
    [
        (bench, ["bench", "--bootstrap-servers", NOWHERE], "psutil", "bench"),
        (bench, ["bench", "--bootstrap-servers", NOWHERE], "matplotlib", "bench"),
        (samples, ["samples", "OUT"], "skimage", "samples"),
    ],
    ids=["bench-psutil", "bench-matplotlib", "samples-skimage"],
)
def test_a_missing_extra_names_the_pip_command(
    module: object,
    argv: list[str],
    absent: str,
    extra: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setitem(sys.modules, absent, None)  # `import absent` now fails as if absent
    argv = [str(tmp_path / "out") if a == "OUT" else a for a in argv]
    assert run_tool(module, argv) == 2
    err = capsys.readouterr().err
    assert err == (
        f"streamer {argv[0]}: streamer {argv[0]} needs the {extra} extra: "
        f"pip install 'streamer[{extra}]' ({absent} is not installed)\n"
    )
    assert not (tmp_path / "out").exists()


class SilentClient:
    """A broker address that accepts nothing and never answers."""

    def __init__(self) -> None:
        self.stopped = False

    async def start(self) -> None:
        await asyncio.Event().wait()

    async def stop(self) -> None:
        self.stopped = True


async def test_a_silent_broker_fails_within_the_connect_timeout_and_is_closed() -> None:
    client = SilentClient()
    with pytest.raises(BrokerUnreachable, match=r"10\.0\.0\.1:9092 \(no answer within 0\.2 s\)"):
        async with connected(client, "10.0.0.1:9092", timeout_s=0.2):
            pytest.fail("a client that never started was handed out")
    assert client.stopped
