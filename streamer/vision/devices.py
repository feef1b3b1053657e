"""Which devices inference runs on: pure logic, so the CUDA path is testable without a GPU."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from streamer.errors import ConfigError

# CPU flags (as /proc/cpuinfo names them) of native bf16 arithmetic: AVX-512 BF16
# (Cooper Lake, Zen 4 and later) and AMX (Sapphire Rapids and later). Without them
# torch emulates bf16, which is slower than fp32.
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def resolve_devices(requested: str, cuda_devices: int, cpu_workers: int = 1) -> list[str]:
    """One inference worker per returned device.

    ``auto`` uses every CUDA device when there is one, else the CPU; ``cuda``
    insists on CUDA and fails clearly without it; ``cpu`` forces the CPU. The CPU
    is returned ``cpu_workers`` times: that many inference workers share its cores,
    each with its own threads (``cpu_inference_workers``).
    """
    if cpu_workers < 1:
        raise ConfigError(f"cpu_inference_workers must be at least 1, not {cpu_workers}")
    cuda = [f"cuda:{i}" for i in range(cuda_devices)]
    if requested == "cpu":
        return ["cpu"] * cpu_workers
    if requested == "cuda":
        if cuda_devices == 0:
            raise ConfigError("--device cuda was requested but no CUDA device is available")
        return cuda
    if requested == "auto":
        return cuda or ["cpu"] * cpu_workers
    raise ConfigError(f"unknown device {requested!r}; expected auto, cpu or cuda")


def threads_per_worker(threads: int | None, devices: list[str], cores: int | None) -> int:
    """torch threads of each inference worker of ``devices`` (``resolve_devices``):
    ``threads`` when set, else the cores shared out among the CPU workers (at least
    one each). A GPU worker's threads run little besides its copies to the device,
    so with GPUs each worker may use every core."""
    return threads or max(1, (cores or 1) // max(1, devices.count("cpu")))


def oversubscribes(devices: list[str], threads: int, cores: int | None) -> bool:
    """Whether the CPU inference workers' threads alone outnumber the cores: then a
    multi-thread forward pass waits at its barriers for threads that are not running."""
    return devices.count("cpu") * threads > (cores or 1)


def cuda_device_count() -> int:
    import torch  # imported here: the main process needs torch only for this question

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The CPU's feature flags (empty when /proc/cpuinfo cannot be read)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def check_precision(precision: str, device: str, flags: frozenset[str] | None = None) -> None:
    """Refuse a precision the device would run slower than fp32, or not at all.

    fp32 runs everywhere and is the default. fp16 needs CUDA. bf16 runs on CUDA,
    and on a CPU only with native bf16 arithmetic (``NATIVE_BF16_FLAGS``): elsewhere
    torch emulates it, slower than fp32 and less accurate.
    """
    on_cpu = not device.startswith("cuda")
    if precision == "fp16" and on_cpu:
        raise ConfigError("--precision fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
    if precision == "bf16" and on_cpu:
        flags = cpu_flags() if flags is None else flags
        if not flags & NATIVE_BF16_FLAGS:
            raise ConfigError(
                "--precision bf16 on this CPU would be emulated (no avx512_bf16 or amx_bf16"
                " flag in /proc/cpuinfo), slower than fp32: use --precision fp32"
            )


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False


def check_jpeg_library(library: str) -> None:
    """Fail at start-up, not in the inference worker, when the chosen library is missing."""
    if library == "nvimgcodec" and not installed("nvidia.nvimgcodec"):
        raise ConfigError(
            "device_jpeg_library nvimgcodec needs nvImageCodec, which is not installed:"
            " pip install nvidia-nvimgcodec-cu13 nvidia-nvjpeg (or use torchvision)"
        )


def jpeg_on_device(mode: str, devices: list[str]) -> bool:
    """Whether JPEGs are decoded by the inference worker on its device.

    ``auto`` does so on CUDA (nvjpeg, batched) and not on the CPU, where the decode
    workers already run in parallel with inference; ``device`` forces it (on the
    CPU too, which is how the path is tested without a GPU); ``cpu`` never.
    """
    if mode == "auto":
        return all(d.startswith("cuda") for d in devices)
    if mode in ("device", "cpu"):
        return mode == "device"
    raise ConfigError(f"unknown jpeg_decode {mode!r}; expected auto, cpu or device")
