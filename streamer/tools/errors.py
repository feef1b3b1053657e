"""What the command-line tools print when they fail: one line with the likely fix.

Every tool's entry point is wrapped in ``one_line_errors``; it is the only place
that turns exceptions into messages. A tool raises a ``ToolError`` subclass
where it knows the context (the address it tried, the topic it looked for, the
file that was too large); ``explain`` maps the few library exceptions that need
no context (a missing file, an invalid setting). Anything else is a bug and
keeps its traceback.

Invariant: the Kafka clients are closed by the code that started them (see
``streamer.tools.common.connected``) before an error reaches this module, so a
failed run never ends with aiokafka's "Unclosed AIOKafkaProducer".
"""

from __future__ import annotations

import argparse
import functools
import importlib
import logging
import sys
from collections.abc import Callable

from aiokafka.errors import KafkaConnectionError, KafkaTimeoutError
from pydantic import ValidationError

COMPOSE_BOOTSTRAP = "127.0.0.1:9094"
BROKER_HINT = (
    f"docker-compose publishes Kafka on {COMPOSE_BOOTSTRAP}: pass --bootstrap-servers "
    f"{COMPOSE_BOOTSTRAP} or set STREAMER_BOOTSTRAP_SERVERS; for the local development "
    "broker run `make kafka-up`"
)

ToolMain = Callable[[argparse.Namespace], int]


class ToolError(Exception):
    """A failure the user can fix; ``str()`` is one line that says how."""

    exit_code = 1


class UsageError(ToolError):
    """The command line asks for something that cannot exist (an unknown reason)."""

    exit_code = 2


class BrokerUnreachable(ToolError):
    def __init__(self, bootstrap_servers: str, why: str) -> None:
        super().__init__(f"cannot reach Kafka at {bootstrap_servers} ({why}). {BROKER_HINT}")
        self.bootstrap_servers = bootstrap_servers


class TopicMissing(ToolError):
    def __init__(self, topic: str) -> None:
        super().__init__(
            f"topic {topic!r} does not exist: check the name, or create it with "
            f"`streamer create-topics {topic}` (no names: the configured input, output "
            "and dead-letter topics)"
        )
        self.topic = topic


class MessageTooLarge(ToolError):
    def __init__(self, topic: str, key: bytes | None, size_bytes: int) -> None:
        name = (key or b"a record").decode(errors="replace")
        super().__init__(
            f"{name} ({size_bytes} bytes) is larger than topic {topic!r} accepts (its "
            "max.message.bytes): raise that with kafka-configs.sh --alter --entity-type topics "
            f"--entity-name {topic} --add-config max.message.bytes=N, or set --max-payload-bytes "
            "(STREAMER_MAX_PAYLOAD_BYTES) below it so that produce refuses such files up front"
        )
        self.topic = topic
        self.size_bytes = size_bytes


class ExtraMissing(ToolError):
    exit_code = 2

    def __init__(self, command: str, extra: str, module: str) -> None:
        super().__init__(
            f"streamer {command} needs the {extra} extra: pip install 'streamer[{extra}]' "
            f"({module} is not installed)"
        )


def require_extra(command: str, extra: str, modules: tuple[str, ...]) -> None:
    """Import ``modules`` (those the extra installs); ExtraMissing names the first absent one.

    Only a missing module counts: any other import failure is a broken install and
    keeps its traceback.
    """
    for module in modules:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            raise ExtraMissing(command, extra, exc.name or module) from exc


def explain(exc: BaseException) -> ToolError | None:
    """The one-line error for ``exc``, or None when it is not one a user can fix."""
    if isinstance(exc, ToolError):
        return exc
    if isinstance(exc, FileNotFoundError | NotADirectoryError):
        return ToolError(f"no such file or folder: {exc.filename or exc}")
    if isinstance(exc, IsADirectoryError):
        return ToolError(f"{exc.filename} is a folder, a file was expected")
    if isinstance(exc, PermissionError):
        return ToolError(f"permission denied: {exc.filename or exc}")
    if isinstance(exc, ValidationError):
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors()
        )
        return UsageError(f"invalid configuration: {problems} (check the STREAMER_* variables)")
    if isinstance(exc, KafkaConnectionError):
        return ToolError(f"Kafka connection failed ({exc}). {BROKER_HINT}")
    if isinstance(exc, KafkaTimeoutError | TimeoutError):
        return ToolError(str(exc) or "Kafka did not answer in time")
    return None


def one_line_errors(command: str, quiet_client_logs: bool = True) -> Callable[[ToolMain], ToolMain]:
    """Wrap a tool's ``_main``: a known failure prints ``streamer COMMAND: message``, exits 1 or 2.

    ``quiet_client_logs`` hides aiokafka's own log lines (it logs every failed
    connection attempt), which would repeat the one-line message as noise.
    """

    def wrap(main: ToolMain) -> ToolMain:
        @functools.wraps(main)
        def run(args: argparse.Namespace) -> int:
            if quiet_client_logs:
                logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
            try:
                return main(args)
            except KeyboardInterrupt:
                return 130
            except Exception as exc:
                error = explain(exc)
                if error is None:
                    raise
                print(f"streamer {command}: {error}", file=sys.stderr)
                return error.exit_code

        return run

    return wrap
