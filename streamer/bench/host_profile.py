"""Where the host path's CPU goes: py-spy samples of the bare loop and the service, split.

``streamer bench --stages host --profile-host`` samples both processes of the host
stage (``streamer.bench.host``) with py-spy while they drain the same records, and
splits each process's samples into the same few parts:

- **Kafka client**: aiokafka (protocol, fetcher, producer, partitioner) and the
  socket reads under it;
- **record reading**: ``streamer.kafka.wire`` (checksums, tolerant parsing of the
  fetched batches), which the service runs in place of aiokafka's reader;
- **own code**: everything else the process's own modules do per record (the
  service: envelope, engine and worker round trips, batching, metrics, CloudEvents
  headers, JSON; the bare loop: its JSON answer);
- **event loop**: waiting in ``select`` and scheduling callbacks and tasks.

A part's CPU per record is its share of the samples times the process's measured
CPU per record. The bare loop is the yardstick: the service's Kafka client part
should cost about what the bare loop's does, so the rest is what the service adds.

py-spy (the ``bench`` extra) attaches to a running process, which needs ptrace
permission: root, or ``kernel.yama.ptrace_scope = 0``. It pauses the process for
each sample (its default): without that, a third of the stacks came back cut short
of the event loop, and which were cut depended on the code (so shares were biased).
"""

from __future__ import annotations

import asyncio
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

KAFKA_CLIENT = "kafka_client"
RECORD_READING = "record_reading"
OWN_CODE = "own_code"
EVENT_LOOP = "event_loop"
PARTS = (KAFKA_CLIENT, RECORD_READING, OWN_CODE, EVENT_LOOP)

RATE_PER_S = 200
OWN_FUNCTIONS_LISTED = 12
_FILE = re.compile(r"\(([^():]+)(?::\d+)?\)$")
_KAFKA_FILES = ("aiokafka/", "asyncio/streams.py")
_TRANSPORT_FILE = "asyncio/selector_events.py"
# Frames on every stack of the process (how it was started), not work of their own.
_ENTRY_FRAMES = {
    ("streamer/__main__.py", "<module>"),
    ("streamer/bench/bare.py", "<module>"),
    ("streamer/bench/bare.py", "main"),
}
_ENTRY_FILES = ("streamer/cli.py",)
_IN_LOOP = "BaseEventLoop._run_once ("


def part_of(stack: str) -> str:
    """The part one sampled stack (py-spy's raw format, ``;``-separated frames
    ``function (file:line)``, outermost first) is charged to."""
    frames = [_frame(f) for f in stack.split(";")]
    files = [file for file, _ in frames]
    if any(file == "streamer/kafka/wire.py" for file in files):
        return RECORD_READING
    if any(file.startswith(_KAFKA_FILES) or _in_transport(file, f) for file, f in frames):
        return KAFKA_CLIENT
    if any(_own_name(file, function) is not None for file, function in frames):
        return OWN_CODE
    return EVENT_LOOP


def _in_transport(file: str, function: str) -> bool:
    """A socket transport's frame (Kafka's connections), not the loop's own event
    processing, which lives in the same file (``BaseSelectorEventLoop._process_events``)."""
    return file == _TRANSPORT_FILE and not function.startswith("BaseSelectorEventLoop.")


def _frame(text: str) -> tuple[str, str]:
    match = _FILE.search(text)
    if match is None:
        return "", text.strip()
    return match.group(1), text[: match.start()].strip()


def split(raw: str, cpu_ms_per_record: float | None) -> dict[str, Any]:
    """Samples per part of a py-spy raw file; with the process's CPU per record, each
    part's milliseconds per record. Only samples taken while the event loop ran count."""
    counts: Counter[str] = Counter()
    own: Counter[str] = Counter()  # own-code samples by the functions on their stacks
    outside = 0
    for line in raw.splitlines():
        stack, _, count = line.rstrip().rpartition(" ")
        if not stack or not count.isdigit():
            continue
        if _IN_LOOP not in stack:
            outside += int(count)  # imports and start-up before the loop ran
            continue
        part = part_of(stack)
        counts[part] += int(count)
        if part == OWN_CODE:
            for name in {_own_name(*_frame(frame)) for frame in stack.split(";")}:
                if name is not None:
                    own[name] += int(count)
    total = sum(counts.values())
    result: dict[str, Any] = {
        "samples": total,
        "samples_outside_the_loop": outside,
        "share": {},
        "ms_per_record": {},
    }
    for part in PARTS:
        share = counts[part] / total if total else 0.0
        result["share"][part] = share
        if cpu_ms_per_record is not None:
            result["ms_per_record"][part] = share * cpu_ms_per_record
    # Where the own code goes, for whoever cuts it next: each function's samples with
    # what it calls (so they overlap), the largest first.
    result["own_code_by_function"] = {
        name: n / total for name, n in own.most_common(OWN_FUNCTIONS_LISTED)
    }
    return result


def _own_name(file: str, function: str) -> str | None:
    """``streamer.module.function`` for a frame of the process's own code, else None
    (another package's frame, or one of the entry frames on every stack)."""
    if not file.startswith("streamer/") or file.startswith(_ENTRY_FILES):
        return None
    if (file, function) in _ENTRY_FRAMES:
        return None
    return f"{file.removesuffix('.py').replace('/', '.')}.{function}"


def py_spy() -> str:
    """py-spy's path: beside this Python (its virtualenv), else on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    path = str(beside) if beside.exists() else shutil.which("py-spy")
    if path is None:
        raise RuntimeError(
            "--profile-host needs py-spy on PATH: pip install -e '.[bench]' (it is in the"
            " bench extra)"
        )
    return path


class Sampler:
    """py-spy recording one process until ``stop`` (or until the process exits)."""

    def __init__(self, pid: int, output: Path) -> None:
        self.output = output
        self._log = output.with_suffix(".log")
        argv = [
            py_spy(), "record", "--pid", str(pid), "--format", "raw",
            "--rate", str(RATE_PER_S), "--output", str(output),
        ]  # fmt: skip
        with self._log.open("wb") as log:
            self._process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)

    def kill(self) -> None:
        """Stop at once, writing nothing (on the way out of a failed run); idempotent."""
        if self._process.poll() is None:
            self._process.kill()
            self._process.wait()

    async def stop(self, timeout_s: float = 30.0) -> str:
        """Stop sampling (py-spy writes its file on SIGINT); return the raw samples."""
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGINT)
        try:
            code = await asyncio.to_thread(self._process.wait, timeout_s)
        except subprocess.TimeoutExpired:
            self._process.kill()
            raise RuntimeError(f"py-spy did not stop within {timeout_s:g} s") from None
        if not self.output.exists():
            raise RuntimeError(
                f"py-spy wrote no samples (exit code {code}; ptrace needs root or"
                f" kernel.yama.ptrace_scope=0): {self._log.read_text()[-1000:]}"
            )
        return self.output.read_text()
