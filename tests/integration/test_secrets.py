"""The real service keeps its SASL password out of logs, command lines and worker environments.

The broker is PLAINTEXT and no SASL mechanism is set, so the password is never
used; it is still read into the settings, which is what the service must guard.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import psutil
import pytest

from streamer import corpus
from tests.integration.helpers import (
    ServiceProcess,
    produce,
    read_exactly,
    service_settings,
    wait_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

SECRET = "hunter2-secret"
DECODE_WORKERS = 2


def spawned_workers(pid: int) -> list[psutil.Process]:
    """The multiprocessing children of ``pid``: decode and inference workers."""
    workers = []
    for child in psutil.Process(pid).children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            if "--multiprocessing-fork" in child.cmdline():
                workers.append(child)
    return workers


def command_lines() -> list[str]:
    """What ``ps -eo args`` shows: every process's command line."""
    lines = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            lines.append(" ".join(proc.cmdline()))
    return lines


async def test_the_password_is_in_no_log_line_command_line_or_worker_environment(
    kafka_bootstrap: str,
    kafka_options: dict[str, str],
    unique_name: str,
    new_topics,
    tmp_path: Path,
) -> None:
    settings = service_settings(
        kafka_bootstrap, unique_name, decode_workers=DECODE_WORKERS, log_level="DEBUG"
    )
    await new_topics("in", "out", "dlq", partitions=1)
    images = list(corpus.generate(4, seed=3))
    await produce(
        kafka_options,
        settings.input_topic,
        [(s.name.encode(), s.data, [("ce_id", s.name.encode())]) for s in images],
    )
    service = ServiceProcess(settings, tmp_path / "service.log")
    # As an operator sets it; the settings would dump the SecretStr masked.
    service.env["STREAMER_SASL_PASSWORD"] = SECRET
    service.start()
    try:
        # Predictions prove the workers run; every decode and inference worker is up.
        await read_exactly(kafka_options, settings.output_topic, len(images), timeout_s=240)

        def workers_up() -> list[psutil.Process] | None:
            found = spawned_workers(service.pid)
            return found if len(found) >= DECODE_WORKERS + 1 else None  # + inference

        workers = await wait_for(workers_up, 60, "the worker processes")
        # The test did give the service the password.
        assert psutil.Process(service.pid).environ()["STREAMER_SASL_PASSWORD"] == SECRET
        # Every descendant, the workers and multiprocessing's resource tracker alike.
        descendants = psutil.Process(service.pid).children(recursive=True)
        assert {w.pid for w in workers} <= {d.pid for d in descendants}
        leaking = {}
        for proc in descendants:
            with contextlib.suppress(psutil.NoSuchProcess):
                environ = proc.environ()
                if any(SECRET in value for value in environ.values()):
                    leaking[proc.pid] = " ".join(proc.cmdline())[:120]
        assert not leaking, f"the password is in the environment of {leaking}"
        assert not [line for line in command_lines() if SECRET in line]
    finally:
        service.terminate()
    log = service.log()
    assert "worker started" in log  # the log is the service's and has content
    assert SECRET not in log
