"""`make demo` (deploy/demo) as a new user runs it: what it shows, and how it fails.

The demo finds the session's local broker with kafkactl and leaves it running.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from streamer.vision.models import imagenet_labels
from tests.conftest import ROOT

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

DEMO = ROOT / "deploy" / "demo"


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port another program listens on (and never answers)."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield int(holder.getsockname()[1])


def run_demo(env: dict[str, str], timeout_s: float) -> tuple[int, list[tuple[float, str]]]:
    """Run the demo; its exit code and each output line with the time it appeared."""
    with subprocess.Popen(
        [str(DEMO)],
        cwd=ROOT,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as process:
        assert process.stdout is not None
        lines: list[tuple[float, str]] = []
        deadline = time.monotonic() + timeout_s
        try:
            for line in process.stdout:
                lines.append((time.monotonic(), line.rstrip("\n")))
                assert time.monotonic() < deadline, "the demo ran too long:\n" + text(lines)
            return process.wait(timeout=max(1.0, deadline - time.monotonic())), lines
        finally:
            if process.poll() is None:
                process.kill()


def text(lines: list[tuple[float, str]]) -> str:
    return "\n".join(line for _, line in lines)


def test_demo_stops_within_30_s_showing_why_when_the_service_cannot_start(
    kafka_bootstrap: str, busy_port: int
) -> None:
    code, lines = run_demo({"STREAMER_METRICS_PORT": str(busy_port)}, timeout_s=240)
    output = text(lines)
    started = next(t for t, line in lines if line.startswith("== starting the service"))
    assert code != 0, output
    assert lines[-1][0] - started < 30, output
    assert "!! the service exited (code 1): while starting" in output
    assert f"cannot serve /metrics on 127.0.0.1:{busy_port}" in output, output
    assert "Traceback" not in output, "the reason is one line, not a traceback"


def test_demo_shows_each_file_with_its_labels_the_weights_and_why_they_are_random(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    torch_home = {"TORCH_HOME": str(tmp_path / "torch")}  # nothing cached: the fallback path
    offline = imagenet_unavailable_in(torch_home) is not None
    code, lines = run_demo({**torch_home, "STREAMER_METRICS_PORT": str(free_port())}, 280)
    output = text(lines)
    assert code == 0, output
    weights = "random:0" if offline else "torchvision:ResNet18_Weights.IMAGENET1K_V1"
    assert re.search(rf'streamer_model_info{{device="cpu",.*weights="{weights}"}}', output), output
    if offline:
        assert "RANDOM WEIGHTS: the labels are real ImageNet classes" in output
        assert "cannot be reached" in output, "the banner says why"
    predictions = [line for _, line in lines if re.search(r"\d{4}-photo-\d+x\d+\.\w+ ", line)]
    assert len(predictions) == 12, output
    labels = set(imagenet_labels())
    for line in predictions:
        top3 = re.split(r"\.(?:jpg|png|webp)\s+", line, maxsplit=1)[1]
        assert top3.split(", ")[0].rsplit(" ", 1)[0] in labels, line
    assert re.search(r"not-an-image\.jpg\s+dead letter: not-an-image", output), output


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def imagenet_unavailable_in(env: dict[str, str]) -> str | None:
    script = "from streamer.vision.models import imagenet_unavailable as u; print(u() or '')"
    result = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return result.stdout.strip() or None
