"""The GPU benchmark's first step, run here on the CPU: device-decoded JPEGs must give
the CPU path's pixels and top-5, every round, or no GPU figure is taken."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from streamer import corpus
from streamer.bench import gpu
from streamer.bench.device_check import DeviceDecodeMismatch, check, same_ranking
from streamer.errors import DecodeError
from streamer.vision import devices
from streamer.vision.device_decode import EncodedJpeg, JpegBatchDecoder

pytestmark = pytest.mark.timeout(120)

IMAGES = [s.data for s in corpus.generate(6, seed=3, sizes=((500, 375),), formats=("JPEG",))]


class Racy:
    """A decoder whose output for one image is overwritten in one round, like a decode
    that writes into memory another stream still reads (pytorch/vision PR 9606)."""

    def __init__(self, victim: int, in_call: int, damage: str = "noise") -> None:
        self.inner = JpegBatchDecoder("cpu")
        self.victim, self.in_call, self.damage = victim, in_call, damage
        self.calls = 0

    def __call__(self, images: list[EncodedJpeg]) -> list[Any]:
        self.calls += 1
        out = self.inner.decode(images)
        if self.calls == self.in_call:
            if self.damage == "noise":
                out[self.victim] = torch.randint(0, 256, out[self.victim].shape, dtype=torch.uint8)
            elif self.damage == "one-level":
                out[self.victim] = (out[self.victim].int() + 1).clamp(0, 255).to(torch.uint8)
            else:
                out[self.victim] = DecodeError("device JPEG decode failed", reason="corrupt")
        return out


def test_the_device_path_on_the_cpu_passes() -> None:
    result = check(IMAGES, "cpu", rounds=2, batch=4)
    assert result["images"] == 6 and result["rounds"] == 2
    assert 0 < result["max_mean_difference_levels"] <= 2.0


def test_a_corrupted_image_stops_the_benchmark_and_is_named() -> None:
    with pytest.raises(DeviceDecodeMismatch, match=r"image 2: corrupted"):
        check(IMAGES, "cpu", rounds=2, batch=6, decoder=Racy(victim=2, in_call=2))


def test_pixels_that_change_between_rounds_are_a_race_even_when_close() -> None:
    with pytest.raises(DeviceDecodeMismatch, match=r"image 4: round 3 decoded other pixels"):
        check(IMAGES, "cpu", rounds=3, batch=6, decoder=Racy(4, in_call=3, damage="one-level"))


def test_an_image_the_device_cannot_decode_fails_the_check() -> None:
    with pytest.raises(DeviceDecodeMismatch, match=r"image 1: the device could not decode it"):
        check(IMAGES, "cpu", rounds=1, batch=6, decoder=Racy(1, in_call=1, damage="error"))


def test_classes_tied_on_the_cpu_may_swap_but_no_others() -> None:
    """Found on an H200: nvjpeg's pixels (0.49 levels from the CPU path's) swapped ranks 2
    and 3 of an image whose CPU scores were 0.02331 and 0.02331, and the strict check left
    a correct decoder out. A tie may swap; a swap of scores further apart may not."""
    cpu_top, scores = [238, 58, 381, 590, 76], [0.03638, 0.02331, 0.02331, 0.01267, 0.01175]
    assert same_ranking([238, 381, 58, 590, 76], cpu_top, scores)
    assert same_ranking(cpu_top, cpu_top, scores)
    assert not same_ranking([238, 58, 381, 76, 590], cpu_top, scores)  # 0.00092 apart
    assert not same_ranking([238, 58, 381, 590, 999], cpu_top, scores)  # another class
    assert not same_ranking([238, 58, 381, 590], cpu_top, scores)


def test_a_library_that_is_not_installed_is_reported_and_the_others_are_checked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(devices.importlib.util, "find_spec", lambda name: None)
    results, passed = gpu.check_libraries(("torchvision", "nvimgcodec"), IMAGES, "cpu", "random:0")
    assert passed == ["torchvision"]
    assert results["torchvision"]["passed"] and results["torchvision"]["images"] == len(IMAGES)
    assert not results["nvimgcodec"]["passed"]
    assert "not installed" in results["nvimgcodec"]["not_installed"]


def test_when_no_library_passes_no_figure_is_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(devices.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DeviceDecodeMismatch, match="no device JPEG library passed"):
        gpu.check_libraries(("nvimgcodec",), IMAGES, "cpu", "random:0")
