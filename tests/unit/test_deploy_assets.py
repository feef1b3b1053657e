"""The Prometheus config, alert rules (with their unit tests), compose file and dashboard parse."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(120)
@pytest.mark.skipif(
    not (shutil.which("promtool") and shutil.which("docker-compose")),
    reason="promtool and docker-compose are installed by make test (deploy/install-system-deps)",
)
def test_deploy_assets_pass_their_checks() -> None:
    result = subprocess.run(
        [str(ROOT / "deploy" / "check-assets")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
