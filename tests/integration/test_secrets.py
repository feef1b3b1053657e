"""The real service keeps its SASL password out of logs, command lines and worker environments,
and out of reach of its workers and of any process of its uid without capabilities.

The broker is PLAINTEXT and no SASL mechanism is set, so the password is never
used; it is still read into the settings, which is what the service must guard.
The tests of reach run the service as the Helm chart does, without capabilities
(as root here, ``setpriv`` drops them all): with them, root reads any process's
environment whatever the service does.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import sys
from pathlib import Path

import psutil
import pytest

from streamer import corpus
from streamer.config import Settings
from tests.integration import fault_workers
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
WITHOUT_CAPABILITIES = ["setpriv", "--inh-caps=-all", "--bounding-set=-all"]
needs_setpriv = pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv")


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


def service_without_capabilities(
    settings: Settings, log_path: Path, fault: str | None = None
) -> ServiceProcess:
    """The service as the Helm chart runs it: no capabilities; with ``fault``, its
    inference workers are ``fault_workers``' (state in the log's folder)."""
    service = ServiceProcess(settings, log_path)
    program = service.argv
    if fault is not None:
        runner = "import sys; from tests.integration import fault_workers as f"
        program = [sys.executable, "-c", f"{runner}; sys.exit(f.service_main())"]
        service.env["STREAMER_TEST_FAULT"] = fault
        service.env["STREAMER_TEST_FAULT_DIR"] = str(log_path.parent)
    service.argv = [*WITHOUT_CAPABILITIES, *program]
    return service


@needs_setpriv
async def test_no_process_of_the_services_uid_without_capabilities_reads_its_environment(
    kafka_bootstrap: str,
    kafka_options: dict[str, str],
    unique_name: str,
    new_topics,
    tmp_path: Path,
) -> None:
    settings = service_settings(kafka_bootstrap, unique_name)
    await new_topics("in", "out", "dlq", partitions=1)
    images = list(corpus.generate(2, seed=5))
    await produce(
        kafka_options, settings.input_topic, [(s.name.encode(), s.data, []) for s in images]
    )
    service = service_without_capabilities(settings, tmp_path / "service.log")
    service.env["STREAMER_SASL_PASSWORD"] = SECRET
    service.start()
    try:
        # Predictions: its workers run, so the service has started every worker it has.
        await read_exactly(kafka_options, settings.output_topic, len(images), timeout_s=240)
        assert psutil.Process(service.pid).environ()["STREAMER_SASL_PASSWORD"] == SECRET
        reader = await asyncio.create_subprocess_exec(
            *WITHOUT_CAPABILITIES,
            "cat",
            f"/proc/{service.pid}/environ",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        stdout, stderr = await asyncio.wait_for(reader.communicate(), 30)
    finally:
        service.terminate()
    assert SECRET.encode() not in stdout
    assert reader.returncode != 0 and b"Permission denied" in stderr, stderr


SNOOP = re.compile(r"snoop environ=(\S+) password=(\S+) broker=(\S+)")


@needs_setpriv
async def test_a_hijacked_worker_reads_no_secret_and_reaches_no_broker_while_the_service_serves(
    kafka_bootstrap: str,
    kafka_options: dict[str, str],
    unique_name: str,
    new_topics,
    tmp_path: Path,
) -> None:
    password_file = tmp_path / "password"  # where the snoop looks
    password_file.write_text(SECRET + "\n")
    settings = service_settings(
        kafka_bootstrap, unique_name, sasl_password_file=str(password_file), max_batch_size=8
    )
    await new_topics("in", "out", "dlq", partitions=1)
    service = service_without_capabilities(settings, tmp_path / "service.log", fault="snoop")
    trigger = (b"trigger.png", fault_workers.trigger_png(), [])
    first = [trigger, *[(s.name.encode(), s.data, []) for s in corpus.generate(4, seed=6)]]
    more = [(s.name.encode(), s.data, []) for s in corpus.generate(4, seed=7)]
    service.start()
    try:
        await produce(kafka_options, settings.input_topic, first)
        await read_exactly(kafka_options, settings.output_topic, len(first), timeout_s=240)
        found = await wait_for(lambda: SNOOP.search(service.log()), 60, "the snoop's log line")
        # The worker that tried keeps serving: the next records are predicted too.
        await produce(kafka_options, settings.input_topic, more)
        await read_exactly(kafka_options, settings.output_topic, len(first) + len(more), 120)
    finally:
        service.terminate()
    outcomes = dict(zip(("environ", "password", "broker"), found.groups(), strict=True))
    assert outcomes == dict.fromkeys(outcomes, "PermissionError"), outcomes
    assert SECRET not in service.log()
