"""The host-path stage's CPU accounting (the stage itself runs in test_bench_quick)."""

from __future__ import annotations

import os
import time

import pytest

from streamer.bench.host import process_cpu_s
from streamer.bench.targets import verdicts

pytestmark = pytest.mark.timeout(30)


def test_process_cpu_counts_this_process_working_and_not_sleeping() -> None:
    before = process_cpu_s(os.getpid())
    deadline = time.process_time() + 0.3
    while time.process_time() < deadline:
        pass
    busy = process_cpu_s(os.getpid()) - before
    assert busy >= 0.2  # clock ticks are 10 ms
    before = process_cpu_s(os.getpid())
    time.sleep(0.3)
    assert process_cpu_s(os.getpid()) - before < 0.1


def test_the_host_targets_are_judged_from_the_stage() -> None:
    host = {"service_vs_bare": 0.5, "service": {"main_cpu_ms_per_record": 0.15}}
    judged = verdicts({"host": host})
    assert judged["host_vs_bare"]["met"] is False
    assert judged["host_main_cpu_ms_per_record"]["met"] is True
