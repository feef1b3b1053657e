"""The command line: help texts, ``run`` flags from the Settings model, precedence and errors."""

from __future__ import annotations

import gc
import logging
import os
import weakref
from collections.abc import Iterator

import pytest

from streamer import cli, logs
from streamer.config import Settings

pytestmark = pytest.mark.timeout(30)


def help_text(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exited:
        cli.main([*argv, "--help"])
    assert exited.value.code == 0
    return capsys.readouterr().out


def run_settings(argv: list[str]) -> Settings:
    return cli.settings_from_args(cli.build_parser().parse_args(["run", *argv]))


@pytest.fixture(autouse=True)
def no_streamer_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The developer's own STREAMER_* variables must not leak into these tests."""
    for name in Settings.model_fields:
        monkeypatch.delenv(f"STREAMER_{name.upper()}", raising=False)


@pytest.mark.parametrize("argv", [[], ["run"]])
def test_help_is_plain_text(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    text = help_text(argv, capsys)
    assert "``" not in text
    assert ":class:" not in text and ".. " not in text


def test_run_help_lists_choices_env_vars_and_descriptions(
    capsys: pytest.CaptureFixture[str],
) -> None:
    text = " ".join(help_text(["run"], capsys).split())  # undo argparse's line wrapping
    assert "--auto-offset-reset {earliest,latest}" in text
    assert "--delivery {at-least-once,exactly-once}" in text
    assert "--log-format {text,json}" in text
    assert "--inference-standby, --no-inference-standby" in text
    assert "[env: STREAMER_MAX_BATCH_SIZE]" in text
    assert "milliseconds a batch waits to fill" in text  # the field's description


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--no-inference-standby"], False),
        (["--inference-standby"], True),
        ([], True),
    ],
)
def test_boolean_settings_are_flags(argv: list[str], expected: bool) -> None:
    assert run_settings(argv).inference_standby is expected


def test_a_boolean_flag_beats_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMER_INFERENCE_STANDBY", "false")
    monkeypatch.setenv("STREAMER_INCLUDE_TIMINGS", "true")
    assert run_settings([]).inference_standby is False
    settings = run_settings(["--inference-standby", "--no-include-timings"])
    assert settings.inference_standby is True
    assert settings.include_timings is False


@pytest.mark.parametrize(
    ("env", "argv", "expected"),
    [
        (None, [], 10.0),  # the default
        ("25", [], 25.0),  # the environment beats the default
        ("25", ["--max-batch-delay-ms", "40"], 40.0),  # a flag beats the environment
    ],
)
def test_flags_beat_the_environment_which_beats_the_default(
    monkeypatch: pytest.MonkeyPatch, env: str | None, argv: list[str], expected: float
) -> None:
    if env is not None:
        monkeypatch.setenv("STREAMER_MAX_BATCH_DELAY_MS", env)
    assert run_settings(argv).max_batch_delay_ms == expected


def test_literal_and_list_flags_are_validated_like_the_environment() -> None:
    settings = run_settings(["--delivery", "exactly-once", "--allowed-formats", "jpeg, png"])
    assert settings.delivery == "exactly-once"
    assert settings.allowed_formats == ("JPEG", "PNG")


def test_none_on_the_command_line_clears_an_optional_setting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("STREAMER_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("STREAMER_SASL_MECHANISM", "PLAIN")
    assert run_settings([]).sasl_mechanism == "PLAIN"
    settings = run_settings(["--security-protocol", "SSL", "--sasl-mechanism", "None"])
    assert settings.sasl_mechanism is None


def test_an_invalid_combination_names_the_fields_and_hides_the_secret(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("STREAMER_SASL_PASSWORD", "hunter2")  # the flag is refused (ps)
    argv = ["run", "--sasl-mechanism", "PLAIN"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "hunter2" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1
    assert "sasl_mechanism" in lines[0] and "security_protocol" in lines[0]


def test_each_invalid_field_gets_one_line_without_its_value(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("STREAMER_SASL_PASSWORD", "hunter2")
    assert cli.main(["run", "--top-k", "0", "--device", "tpu"]) == 2
    err = capsys.readouterr().err
    assert "hunter2" not in err and "tpu" not in err
    lines = err.strip().splitlines()
    assert [line.split(":")[1] for line in lines] == [
        " invalid setting device",  # in the order of the fields
        " invalid setting top_k",
    ]


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.usefixtures("restore_logging")
def test_run_passes_the_log_format_to_logging_and_to_spawned_workers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    served: list[Settings] = []

    async def fake_serve(settings: Settings) -> int:
        served.append(settings)
        return 0

    monkeypatch.setattr(cli, "_serve", fake_serve)
    monkeypatch.setenv(logs.FORMAT_ENV, "text")  # restored after the test
    assert cli.main(["run", "--log-format", "json", "--log-level", "WARNING"]) == 0
    assert served[0].log_format == "json"
    root = logging.getLogger()
    assert root.level == logging.WARNING
    assert isinstance(root.handlers[0].formatter, logs.JsonFormatter)
    # Workers are spawned: they read the format from the environment they inherit.
    assert os.environ[logs.FORMAT_ENV] == "json"


def test_tuned_gc_makes_collections_rarer_still_collects_new_cycles_and_undoes_itself() -> None:
    threshold = gc.get_threshold()
    with cli.tuned_gc():
        assert gc.get_freeze_count() > 0, "what exists at start-up leaves the collector's walks"
        assert gc.get_threshold() == (cli.GC_YOUNG_THRESHOLD, *threshold[1:])

        class Node:
            peer: object = None

        node = Node()
        node.peer = node  # a cycle made while serving
        ref = weakref.ref(node)
        del node
        gc.collect()
        assert ref() is None
    # Shutdown frees the heap as usual (the demo's last error line was once buried
    # under nanobind's leak report of a frozen heap).
    assert gc.get_freeze_count() == 0
    assert gc.get_threshold() == threshold
