"""Command line: ``streamer run | produce | consume | create-topics | samples | replay | bench``.

``run`` has one flag per ``Settings`` field (``--max-batch-size`` for
``max_batch_size``); each is also settable as ``STREAMER_<FIELD>``. Flags that
are not given fall through to the environment, then to the defaults.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from typing import Any

from pydantic import ValidationError

from streamer import logs
from streamer.config import Settings
from streamer.errors import StreamerError

log = logging.getLogger("streamer")

RUN_HELP = {
    "bootstrap_servers": "Kafka bootstrap servers, comma separated",
    "weights": "imagenet | random[:SEED] | PATH to a ResNet18 state_dict",
    "device": "auto | cpu | cuda",
    "metrics_port": "port of /metrics, /healthz and /readyz (0 picks a free port)",
}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    result: int = args.func(args)
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streamer", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command")

    run = commands.add_parser("run", help="run the classification service")
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        help_text = RUN_HELP.get(name, field.description or "")
        default = field.get_default(call_default_factory=True)
        run.add_argument(
            flag,
            dest=name,
            default=None,
            help=f"{help_text} (env STREAMER_{name.upper()}, default {default!r})",
        )
    run.set_defaults(func=_run)

    from streamer.tools import (  # light: no torch import
        admin,
        bench,
        consume,
        produce,
        replay,
        samples,
    )

    for tool in (produce, consume, admin, samples, replay, bench):
        tool.add_parser(commands)
    return parser


def settings_from_args(args: argparse.Namespace) -> Settings:
    given: dict[str, Any] = {}
    for name, _field in Settings.model_fields.items():
        value = getattr(args, name, None)
        if value is None:
            continue
        given[name] = value
    return Settings(**given)


def _run(args: argparse.Namespace) -> int:
    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        print(f"streamer: invalid configuration:\n{exc}", file=sys.stderr)
        return 2
    logs.configure(settings.log_level)
    try:
        return asyncio.run(_serve(settings))
    except StreamerError as exc:
        log.error("%s", exc)
        return 1


async def _serve(settings: Settings) -> int:
    from streamer.app import Service  # imports torch; only `run` needs it

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
    await service.run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
