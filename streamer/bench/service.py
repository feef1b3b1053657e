"""The service (or the naive baseline) as a child process, and its memory over time.

``ServiceProcess`` runs ``python -m streamer run`` with ``STREAMER_*`` variables,
as an operator would, and waits for ``/readyz``. ``MemorySampler`` records the
child's RSS and PSS, each summed over the process and all its descendants
(decode and inference workers), plus the ``/dev/shm`` segments whose names carry
the service's prefix (``streamer-<pid>-``): reserved size and pages allocated.
RSS counts a shared page once per process that maps it; PSS splits it between
them, so the PSS sum is the better total.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr

from streamer.config import Settings
from streamer.workers.shm import NAME_PREFIX, SHM_DIR

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class ChildProcess:
    """A benchmark child process with its output in a log file, stopped with SIGTERM."""

    def __init__(self, argv: list[str], env: dict[str, str], log_path: Path) -> None:
        self.argv = argv
        self.env = env
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:  # the child keeps its own copy
            self.process = subprocess.Popen(
                self.argv, env=self.env, stdout=log, stderr=log, start_new_session=True
            )

    def check_alive(self) -> None:
        assert self.process is not None
        if self.process.poll() is not None:
            tail = self.log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{self.argv[2:]} exited with {self.process.returncode}:\n{tail}")

    def stop(self, timeout_s: float = 60.0) -> int | None:
        """SIGTERM (the service drains), then SIGKILL the group after ``timeout_s``."""
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else None
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            return self.process.wait(timeout=30)


def service_env(settings: Settings) -> dict[str, str]:
    """This process's environment with its ``STREAMER_*`` variables replaced by
    ``settings``, so that the child reads back the same settings.

    A secret goes in as its value: ``str()`` of a ``SecretStr`` is its mask, and a
    SASL benchmark would then log in with the mask. The environment, unlike the
    command line, is not shown to other users by ``ps``.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMER_")}
    for name, value in settings.model_dump(exclude_none=True).items():
        env[f"STREAMER_{name.upper()}"] = _env_value(value)
    return env


def _env_value(value: object) -> str:
    """One setting as its ``STREAMER_*`` variable spells it."""
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, tuple):
        return ",".join(value)  # the one list setting takes "JPEG,PNG", not JSON
    return str(value)


class ServiceProcess(ChildProcess):
    """``python -m streamer run`` configured through the environment."""

    def __init__(self, settings: Settings, log_path: Path) -> None:
        super().__init__([sys.executable, "-m", "streamer", "run"], service_env(settings), log_path)
        self.settings = settings

    async def wait_ready(self, timeout_s: float = 300.0) -> float:
        """Poll ``/readyz`` until it answers 200; return the seconds it took."""
        url = f"http://{self.settings.metrics_host}:{self.settings.metrics_port}/readyz"
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            self.check_alive()
            if await asyncio.to_thread(_answers_200, url):
                return time.monotonic() - started
            await asyncio.sleep(0.5)
        raise TimeoutError(f"service not ready after {timeout_s} s (log: {self.log_path})")


@dataclass(frozen=True)
class MachineCpu:
    """The whole machine's CPU seconds since boot (``/proc/stat``): busy and all,
    summed over its ``cores``."""

    busy_s: float
    all_s: float
    cores: int

    @classmethod
    def now(cls) -> MachineCpu:
        return cls.parse(Path("/proc/stat").read_text())

    @classmethod
    def parse(cls, proc_stat: str) -> MachineCpu:
        lines = proc_stat.splitlines()
        # user nice system idle iowait irq softirq steal (guest time is inside user).
        # Steal is time the hypervisor gave to another guest: not this machine's work.
        ticks = [int(x) for x in lines[0].split()[1:9]]
        busy = ticks[0] + ticks[1] + ticks[2] + ticks[5] + ticks[6]
        cores = sum(1 for line in lines if line.startswith("cpu") and line[3].isdigit())
        return cls(busy / CLOCK_TICKS, sum(ticks) / CLOCK_TICKS, cores)

    def busy_cores_since(self, first: MachineCpu) -> float | None:
        """Cores busy on average since ``first``, every process of the machine
        (the broker, the load generator, the workers); None over no time."""
        elapsed = self.all_s - first.all_s
        if elapsed <= 0:
            return None
        # min: seconds from ticks carry rounding, and all busy must read as all cores
        return min(float(self.cores), (self.busy_s - first.busy_s) / elapsed * self.cores)


def scrape_metrics(settings: Settings) -> str:
    """The service's ``/metrics`` page (blocking: call it in a thread)."""
    url = f"http://{settings.metrics_host}:{settings.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as reply:
        return str(reply.read().decode())


def metric_value(metrics_text: str, name: str, **labels: str) -> float | None:
    """The first sample ``name`` of a ``/metrics`` page whose labels include
    ``labels``; None when there is none."""
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                return float(sample.value)
    return None


def _answers_200(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as reply:
            return bool(reply.status == 200)
    except OSError:
        return False


@dataclass
class MemorySample:
    t_s: float  # since the sampler started
    rss_bytes: int
    pss_bytes: int
    processes: int
    shm_reserved_bytes: int
    shm_allocated_bytes: int
    load1: float  # the machine's 1-minute load average (other work shows here)


@dataclass
class MemorySampler:
    """Samples a process tree's memory every ``interval_s`` in a background task."""

    pid: int
    interval_s: float = 2.0
    samples: list[MemorySample] = field(default_factory=list)
    _task: asyncio.Task[None] | None = None
    _t0: float = 0.0

    async def start(self) -> None:
        self._t0 = time.monotonic()
        self._task = asyncio.create_task(self._loop(), name="memory-sampler")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def mark(self) -> float:
        """Seconds since the sampler started (to cut the samples into phases)."""
        return time.monotonic() - self._t0

    async def sample_now(self) -> MemorySample | None:
        sample = await asyncio.to_thread(self._sample)
        if sample is not None:
            self.samples.append(sample)
        return sample

    async def _loop(self) -> None:
        while True:
            await self.sample_now()
            await asyncio.sleep(self.interval_s)

    def _sample(self) -> MemorySample | None:
        t = self.mark()
        try:
            root = psutil.Process(self.pid)
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return None
        rss = pss = 0
        for proc in tree:
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                info = proc.memory_full_info()
                rss += info.rss
                pss += getattr(info, "pss", info.rss)
        reserved, allocated = shm_usage(self.pid)
        return MemorySample(t, rss, pss, len(tree), reserved, allocated, os.getloadavg()[0])

    def summary(self, since_s: float = 0.0) -> dict[str, Any]:
        chosen = [s for s in self.samples if s.t_s >= since_s] or self.samples
        if not chosen:
            return {}
        return {
            "peak_rss_bytes": max(s.rss_bytes for s in chosen),
            "peak_pss_bytes": max(s.pss_bytes for s in chosen),
            "peak_shm_allocated_bytes": max(s.shm_allocated_bytes for s in chosen),
            "shm_reserved_bytes": max(s.shm_reserved_bytes for s in chosen),
            "processes": max(s.processes for s in chosen),
            "samples": len(chosen),
        }


def shm_usage(pid: int) -> tuple[int, int]:
    """(reserved, allocated) bytes of the ``/dev/shm`` segments the instance ``pid`` owns."""
    reserved = allocated = 0
    for path in SHM_DIR.glob(f"{NAME_PREFIX}{pid}-*"):
        with contextlib.suppress(FileNotFoundError):
            st = path.stat()
            reserved += st.st_size
            allocated += st.st_blocks * 512
    return reserved, allocated
