"""Device selection and precision rules: the CUDA path, tested without a GPU."""

from __future__ import annotations

import pytest

from streamer.errors import ConfigError
from streamer.vision.devices import (
    check_precision,
    cpu_flags,
    oversubscribes,
    resolve_devices,
    threads_per_worker,
)


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


def test_the_cpu_is_returned_once_per_cpu_inference_worker_and_cuda_ignores_them() -> None:
    assert resolve_devices("cpu", 0, cpu_workers=2) == ["cpu", "cpu"]
    assert resolve_devices("auto", 0, cpu_workers=3) == ["cpu"] * 3
    assert resolve_devices("auto", 1, cpu_workers=2) == ["cuda:0"]  # one worker per GPU
    with pytest.raises(ConfigError, match="at least 1"):
        resolve_devices("cpu", 0, cpu_workers=0)


@pytest.mark.parametrize(
    ("threads", "devices", "cores", "expected"),
    [
        (None, ["cpu"], 2, 2),  # one worker: every core
        (None, ["cpu"] * 2, 2, 1),  # the cores shared out
        (None, ["cpu"] * 3, 8, 2),
        (None, ["cpu"] * 4, 2, 1),  # at least one each
        (3, ["cpu"] * 2, 2, 3),  # set: as set
        (None, ["cpu"], None, 1),  # cores unknown
        (None, ["cuda:0", "cuda:1"], 16, 16),  # GPU workers are not CPU workers
    ],
)
def test_threads_per_worker(
    threads: int | None, devices: list[str], cores: int | None, expected: int
) -> None:
    assert threads_per_worker(threads, devices, cores) == expected


@pytest.mark.parametrize(
    ("devices", "threads", "cores", "expected"),
    [
        (["cpu"] * 2, 1, 2, False),
        (["cpu"], 2, 2, False),
        (["cpu"] * 2, 2, 2, True),  # four threads on two cores
        (["cpu"] * 8, 1, 2, True),
        (["cuda:0", "cuda:1"], 16, 16, False),
    ],
)
def test_threads_that_outnumber_the_cores_are_told(
    devices: list[str], threads: int, cores: int, expected: bool
) -> None:
    assert oversubscribes(devices, threads, cores) is expected


def test_cuda_without_a_gpu_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="no CUDA device"):
        resolve_devices("cuda", 0)


def test_fp16_needs_cuda() -> None:
    check_precision("fp16", "cuda:0")
    with pytest.raises(ConfigError, match="fp16"):
        check_precision("fp16", "cpu")


AVX2_ONLY = frozenset({"fpu", "sse4_2", "avx2", "fma"})


@pytest.mark.parametrize("native", ["avx512_bf16", "amx_bf16"])
def test_bf16_on_a_cpu_needs_native_bf16(native: str) -> None:
    check_precision("bf16", "cpu", AVX2_ONLY | {native})
    with pytest.raises(ConfigError, match=r"emulated.*--precision fp32"):
        check_precision("bf16", "cpu", AVX2_ONLY)


def test_bf16_on_cuda_and_fp32_anywhere_need_no_cpu_flag() -> None:
    check_precision("bf16", "cuda:0", frozenset())
    check_precision("fp32", "cpu", frozenset())


def test_cpu_flags_are_read_from_cpuinfo(tmp_path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16\n\nprocessor\t: 1\n")
    assert cpu_flags(cpuinfo) == {"fpu", "avx2", "avx512_bf16"}
    assert cpu_flags(tmp_path / "missing") == frozenset()
