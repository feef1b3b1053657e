"""Which devices inference runs on: pure logic, so the CUDA path is testable without a GPU."""

from __future__ import annotations

from streamer.errors import ConfigError


def resolve_devices(requested: str, cuda_devices: int) -> list[str]:
    """One inference worker per returned device.

    ``auto`` uses every CUDA device when there is one, else the CPU; ``cuda``
    insists on CUDA and fails clearly without it; ``cpu`` forces the CPU.
    """
    if requested == "cpu":
        return ["cpu"]
    if requested == "cuda":
        if cuda_devices == 0:
            raise ConfigError("--device cuda was requested but no CUDA device is available")
        return [f"cuda:{i}" for i in range(cuda_devices)]
    if requested == "auto":
        return [f"cuda:{i}" for i in range(cuda_devices)] or ["cpu"]
    raise ConfigError(f"unknown device {requested!r}; expected auto, cpu or cuda")


def cuda_device_count() -> int:
    import torch  # imported here: the main process needs torch only for this question

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_precision(precision: str, device: str) -> None:
    if precision == "fp16" and not device.startswith("cuda"):
        raise ConfigError("--precision fp16 needs a CUDA device; use bf16 or fp32 on the CPU")


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
