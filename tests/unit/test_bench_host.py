"""The host-path stage's CPU accounting (the stage itself runs in test_bench_quick)."""

from __future__ import annotations

import os
import re
import time

import pytest

from streamer import cli
from streamer.bench.host import process_cpu_s, together
from streamer.bench.targets import verdicts
from streamer.bench.workload import BenchConfig

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


def test_the_host_stage_needs_a_service_and_a_record_for_each() -> None:
    with pytest.raises(ValueError, match="host_instances must be at least 1"):
        BenchConfig(host_instances=0)
    with pytest.raises(
        ValueError, match=re.escape("host_records (3) must be at least host_instances (4)")
    ):
        BenchConfig(host_records=3, host_instances=4)
    assert BenchConfig(host_records=4, host_instances=4).host_instances == 4


def test_several_drains_are_counted_only_while_all_of_them_run() -> None:
    # a: 10/s from 0 to 10 s; b starts at 2 s and ends at 12 s, 20/s.
    a = [i / 10 for i in range(101)]
    b = [2 + i / 20 for i in range(201)]
    both = together([b, a])
    assert both["seconds"] == pytest.approx(8.0)  # from 2 s (b's first) to 10 s (a's last)
    # In (2, 10]: a's 80 appends and b's 160.
    assert both["counted"] == 80 + 160
    assert both["images_per_s"] == pytest.approx(240 / 8.0)
    assert both["overlap"] == pytest.approx(8.0 / 12.0)


def test_drains_that_never_ran_together_have_no_rate() -> None:
    apart = together([[0.0, 1.0], [2.0, 3.0]])
    assert apart["images_per_s"] == 0.0 and apart["counted"] == 0
    assert apart["seconds"] == 0.0 and apart["overlap"] == 0.0


def test_the_bench_command_refuses_a_host_stage_it_cannot_run(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli.main(["bench", "--stages", "host", "--host-instances", "0"]) == 2
    assert "streamer bench: host_instances must be at least 1" in capsys.readouterr().err
