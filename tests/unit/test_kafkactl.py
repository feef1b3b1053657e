"""deploy/kafka/kafkactl's process bookkeeping, exercised on stand-in processes (no broker).

kafkactl is sourced into bash, so its functions run on a folder of the test's own; the
"broker" is a shell that sleeps.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import KAFKACTL

pytestmark = pytest.mark.timeout(60)


def kafkactl_functions(script: str, folder: Path) -> subprocess.CompletedProcess[str]:
    """Run SCRIPT in bash after sourcing kafkactl (which then defines its functions only)."""
    prelude = f'source "{KAFKACTL}"\nbroker_java=(bash -c "sleep 30" stand-in)\ndir="{folder}"\n'
    return subprocess.run(
        ["bash", "-c", prelude + script],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "STREAMER_KAFKA_HOME": str(folder / "home")},
    )


def test_sourcing_kafkactl_runs_no_command(tmp_path: Path) -> None:
    result = kafkactl_functions("echo sourced", tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "sourced\n"
    assert "usage" not in result.stderr


def test_a_node_launched_but_not_yet_exec_ed_counts_as_running(tmp_path: Path) -> None:
    # The CI failure of stop 17: `kafkactl up` said "broker exited during start" with an empty
    # log. Between fork and exec the child's command line is kafkactl's own, without
    # server.properties, and the pid-reuse check took the live child for a stranger. Opening a
    # FIFO for writing blocks in the child's redirection, i.e. exactly in that window.
    os.mkfifo(tmp_path / "broker.log")
    result = kafkactl_functions(
        """
        launch "$dir"
        pid=$(cat "$dir/broker.pid")
        if running "$dir"; then echo running; else echo "not running"; fi
        kill -9 "$pid"; wait "$pid" 2>/dev/null || true
        if running "$dir"; then echo "still running"; else echo gone; fi
        """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:2] == ["running", "gone"]


def test_a_reused_pid_is_not_taken_for_the_node(tmp_path: Path) -> None:
    # The node's pid now belongs to another program (here: the test process, started
    # seconds before the node; the shell itself may share the node's 10 ms start-time
    # tick, which once made this test fail): kafkactl must not signal it.
    result = kafkactl_functions(
        """
        launch "$dir"
        pid=$(cat "$dir/broker.pid")
        kill -9 "$pid"; wait "$pid" 2>/dev/null || true
        echo $PPID > "$dir/broker.pid"
        if running "$dir"; then echo running; else echo "not running"; fi
        """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "not running\n"
