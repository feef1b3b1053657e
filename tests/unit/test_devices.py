"""Device selection and precision rules: the CUDA path, tested without a GPU."""

from __future__ import annotations

import pytest

from streamer.errors import ConfigError
from streamer.vision.devices import check_precision, resolve_devices


@pytest.mark.parametrize(
    ("requested", "gpus", "expected"),
    [
        ("auto", 0, ["cpu"]),
        ("auto", 1, ["cuda:0"]),
        ("auto", 2, ["cuda:0", "cuda:1"]),  # one inference worker per GPU
        ("cpu", 4, ["cpu"]),
        ("cuda", 2, ["cuda:0", "cuda:1"]),
    ],
)
def test_devices_are_resolved(requested: str, gpus: int, expected: list[str]) -> None:
    assert resolve_devices(requested, gpus) == expected


def test_cuda_without_a_gpu_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="no CUDA device"):
        resolve_devices("cuda", 0)


def test_fp16_needs_cuda() -> None:
    check_precision("fp16", "cuda:0")
    check_precision("bf16", "cpu")
    with pytest.raises(ConfigError, match="fp16"):
        check_precision("fp16", "cpu")
