"""Which weights can load: the check the demo runs before choosing them."""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import torch

from streamer.vision import models

pytestmark = pytest.mark.timeout(30)


def test_imagenet_weights_in_torchs_cache_are_available(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "resnet18-f37072fd.pth").write_bytes(b"weights")

    def offline(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a cached file needs no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    assert models.imagenet_unavailable() is None


def test_imagenet_weights_neither_cached_nor_reachable_say_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))

    def offline(*args: Any, **kwargs: Any) -> None:
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    why = models.imagenet_unavailable()
    assert why is not None
    assert str(tmp_path / "checkpoints") in why and "Name or service not known" in why
    assert "download.pytorch.org" in why
