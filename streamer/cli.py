"""Command line: ``streamer run`` and the tools (produce, consume, create-topics, samples,
replay, bench, lag, capacity).

The top level is a plain argparse parser; each tool adds its own subcommand
through ``add_parser(commands)``. The flags of ``run`` are not written here: they
come from the ``Settings`` model through pydantic-settings' CLI source, so each
field has one kebab-case flag (``--max-batch-size``), its ``Literal`` choices and
its description (with the unit) in the help, booleans as real flags
(``--inference-standby`` / ``--no-inference-standby``), and its ``STREAMER_*``
variable shown next to it. Precedence: flag, then environment, then default.

Help texts are plain text: argparse prints them as they are, so nothing here
uses reStructuredText markup in a string that reaches ``--help``.

Invalid settings end ``run`` with exit status 2 and one line per error naming the
field and the reason, never the value given (it may be a password).

Secrets never come from the command line, which every user sees in ``ps``:
``--sasl-password`` is hidden from the help and refused. The password comes from
``STREAMER_SASL_PASSWORD`` or from a file (``--sasl-password-file``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys
from collections.abc import Iterator

from pydantic import ValidationError
from pydantic_settings import CliSettingsSource, SettingsError

from streamer import logs
from streamer.config import Settings
from streamer.errors import StreamerError
from streamer.workers.environment import start_resource_tracker

log = logging.getLogger("streamer")

DESCRIPTION = "Kafka-native image classification: the service and its tools."
RUN_HELP = "run the classification service"
RUN_DESCRIPTION = (
    "Classify the images on the input topic and publish one prediction per image"
    " to the output topic. Every option can also be set with the environment"
    " variable shown next to it; an option given here wins over the environment,"
    " which wins over the default."
)
EPILOG = "Run 'streamer COMMAND --help' for the options of a command."
METAVARS = {"SecretStr": "str", "tuple[str,...]": "str,..."}
# Settings that are secrets: their flags would show in ps, so they are refused.
SECRET_FLAGS = {"sasl_password": "--sasl-password"}
SECRET_FLAG_REFUSED = (
    "{flag} is refused: the command line shows in ps; set STREAMER_SASL_PASSWORD,"
    " or put the password in a file and pass --sasl-password-file"
    " (or STREAMER_SASL_PASSWORD_FILE)"
)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    result: int = args.func(args)
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streamer", description=DESCRIPTION, epilog=EPILOG)
    commands = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND")

    run = commands.add_parser(
        "run", help=RUN_HELP, description=RUN_DESCRIPTION, usage="%(prog)s [OPTIONS]"
    )
    settings_source(run)
    for action in run._actions:
        # pydantic-settings names the type; these two read better as what to type.
        if isinstance(action.metavar, str):
            action.metavar = METAVARS.get(action.metavar, action.metavar)
        if action.dest in SECRET_FLAGS:
            action.help = argparse.SUPPRESS  # accepted only to be refused by name
    run.set_defaults(func=_run)

    from streamer.tools import (  # light: no torch import
        admin,
        bench,
        capacity,
        consume,
        lag,
        produce,
        replay,
        samples,
    )

    for tool in (produce, consume, admin, samples, replay, bench, lag, capacity):
        tool.add_parser(commands)
    return parser


def settings_source(
    parser: argparse.ArgumentParser | None = None,
) -> CliSettingsSource[argparse.ArgumentParser]:
    """The CLI source of ``Settings``; given a parser, it adds one flag per field to it."""
    return CliSettingsSource(
        Settings,
        root_parser=parser,
        cli_prog_name="streamer run",
        cli_implicit_flags=True,
        cli_kebab_case=True,
        cli_show_env_vars=True,
        cli_hide_none_type=True,
        cli_avoid_json=True,
    )


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Settings from parsed ``run`` flags, then ``STREAMER_*`` variables, then defaults.

    Flags not given are absent from ``args`` (their argparse default is SUPPRESS),
    so they fall through to the environment. A secret given as a flag is refused
    with a ``SettingsError`` that names the flag, not the value.
    """
    given = {name: value for name, value in vars(args).items() if name in Settings.model_fields}
    for name, flag in SECRET_FLAGS.items():
        if name in given:
            raise SettingsError(SECRET_FLAG_REFUSED.format(flag=flag))
    source = settings_source()(parsed_args=given)
    # mypy sees only the fields in the model's __init__, not BaseSettings' own arguments.
    return Settings(_cli_settings_source=source)  # type: ignore[call-arg]


def describe_invalid(exc: ValidationError | SettingsError) -> list[str]:
    """One line per error: where and why, without the input (it may be a secret)."""
    if isinstance(exc, SettingsError):
        return [str(exc).splitlines()[0]]
    lines = []
    for error in exc.errors(include_url=False, include_input=False, include_context=False):
        reason = error["msg"]
        if error["type"] == "value_error":  # "Value error, <our validator's message>"
            reason = reason.removeprefix("Value error, ")
        field = ".".join(str(part) for part in error["loc"])
        lines.append(
            f"invalid setting {field}: {reason}" if field else f"invalid settings: {reason}"
        )
    return lines


def _run(args: argparse.Namespace) -> int:
    try:
        settings = settings_from_args(args)
    except (ValidationError, SettingsError) as exc:
        for line in describe_invalid(exc):
            print(f"streamer run: {line}", file=sys.stderr)
        return 2
    # Spawned workers inherit the environment, not the logging setup (see logs).
    os.environ[logs.FORMAT_ENV] = settings.log_format
    logs.configure(settings.log_level, settings.log_format)
    try:
        return asyncio.run(_serve(settings))
    except StreamerError as exc:
        log.error("%s", exc)
        return 1


# Allocations between young-generation collections (CPython's default: 700).
GC_YOUNG_THRESHOLD = 10_000


@contextlib.contextmanager
def tuned_gc() -> Iterator[None]:
    """Make the collector cheap for a long-running event loop while serving.

    The event loop allocates dozens of tracked objects per record (tasks, futures,
    tuples, dataclasses), so with the defaults a young collection ran every ~20
    records and every older one walked the whole heap, torch's modules included:
    0.8-1.0 s of a 7 s drain of 30,000 records with the null model. ``gc.freeze``
    moves what exists on entry (the imported modules) out of the collector's walks,
    and a larger young threshold makes collections rarer. Cycles are still
    collected. Measured with the host benchmark: 0.21-0.23 -> 0.18-0.20 ms of
    main-process CPU per record (docs/BENCHMARKS.md).

    On exit the heap is unfrozen and the thresholds restored, so that interpreter
    shutdown frees it as usual: extension modules that check for leaks at exit
    (nanobind, under torch) otherwise print hundreds of lines over the last error.
    """
    threshold = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *threshold[1:])
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)


async def _serve(settings: Settings) -> int:
    from streamer.app import Service  # imports torch; only `run` needs it

    # Before the first shared-memory segment would start it with the credentials.
    start_resource_tracker()
    service = Service(settings)
    loop = asyncio.get_running_loop()
    signals = {"count": 0}

    def on_signal(signum: int) -> None:
        signals["count"] += 1
        if signals["count"] == 1:
            log.info("signal %s: draining (send again to force exit)", signal.Signals(signum).name)
            service.request_stop()
        else:
            log.warning("second signal: exiting now without draining")
            os._exit(130)

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)
    with tuned_gc():
        await service.run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
