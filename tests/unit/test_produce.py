"""``streamer produce`` refuses files the service would only dead-letter, before sending any."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from streamer.tools.produce import _main

pytestmark = pytest.mark.timeout(30)


def test_files_above_the_payload_limit_are_named_and_nothing_is_sent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("STREAMER_MAX_PAYLOAD_BYTES", "2048")
    (tmp_path / "small.jpg").write_bytes(b"x" * 2048)
    (tmp_path / "large.jpg").write_bytes(b"x" * 2049)
    args = argparse.Namespace(
        paths=[str(tmp_path)],
        topic=None,
        quiet=True,
        bootstrap_servers="127.0.0.1:1",  # never contacted
        command="produce",
    )
    assert _main(args) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"{tmp_path / 'large.jpg'}: 2049 bytes, above max_payload_bytes=2048"
    assert err[1].startswith("nothing sent: raise STREAMER_MAX_PAYLOAD_BYTES")
    assert len(err) == 2
