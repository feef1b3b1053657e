"""JPEG decoding on the inference device, batched (nvjpeg on CUDA).

On a GPU, decoding JPEGs on the CPU is what limits throughput long before the
model does. With ``jpeg_decode`` on the device, a decode worker only *probes* a
JPEG (format allow-list, byte and pixel limits, EXIF orientation: header work,
no pixels) and leaves the encoded bytes in the payload slot. The inference
worker then decodes the whole batch's JPEGs in one call on the device
(``device_jpeg_library``: torchvision's ``decode_jpeg``, the default, or
nvImageCodec), applies the EXIF orientation, resizes the shorter side to 256
(bilinear, antialiased; one call per group of images of one size) and
centre-crops 224, all on the device.

Every other format, and JPEGs the device decoder cannot take (CMYK, 16-bit),
keep the CPU path. If the batched call fails, each image is decoded on its own;
an image the device cannot decode falls back to the exact CPU path, and only an
image that fails there too becomes a dead letter.

Pixels differ slightly from the CPU path (a different IDCT and a tensor resize
instead of Pillow's), by a few levels at most; tests bound the difference, and
``make bench-gpu`` checks both libraries on the GPU before it measures them
(docs/BENCHMARKS.md, "GPU check on an NVIDIA H200").
The same code runs with ``device="cpu"``, which is how it is tested without a GPU.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as F

from streamer.errors import ConfigError, DecodeError
from streamer.vision.decode import CROP, EXIF_ORIENTATION, probe, resized_size

__all__ = ["EXIF_ORIENTATION", "LIBRARIES", "EncodedJpeg", "JpegBatchDecoder", "orient", "probe"]

# What PIL's ImageOps.exif_transpose does for each orientation, on a CHW tensor.
_ORIENT: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {
    1: lambda x: x,
    2: lambda x: x.flip(-1),
    3: lambda x: x.flip(-2, -1),
    4: lambda x: x.flip(-2),
    5: lambda x: x.transpose(-2, -1),
    6: lambda x: x.rot90(-1, dims=(-2, -1)),
    7: lambda x: x.transpose(-2, -1).flip(-2, -1),
    8: lambda x: x.rot90(1, dims=(-2, -1)),
}


def orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    return _ORIENT[orientation](image)


def resize_and_crop(image: torch.Tensor) -> torch.Tensor:
    """CHW uint8 -> 3x224x224 uint8: shorter side to 256, centre crop, as the CPU path."""
    height, width = image.shape[-2:]
    new_w, new_h = resized_size(width, height)
    if (new_w, new_h) != (width, height):
        image = F.resize(
            image, [new_h, new_w], interpolation=F.InterpolationMode.BILINEAR, antialias=True
        )
    return F.center_crop(image, [CROP, CROP])


def resize_and_crop_all(images: list[torch.Tensor]) -> list[torch.Tensor]:
    """``resize_and_crop`` of each image, with one resize per group of images of one size.

    A batch's photos mostly share a few sizes; on a GPU one call for 256 images costs
    what one call for one image does, where 256 calls pay 256 launches of each kernel."""
    if not images:
        return []
    by_size: dict[tuple[int, ...], list[int]] = {}
    for i, image in enumerate(images):
        by_size.setdefault(tuple(image.shape), []).append(i)
    out: list[torch.Tensor] = [images[0]] * len(images)  # each place is filled below
    for rows in by_size.values():
        group = torch.stack([images[i] for i in rows])
        for i, image in zip(rows, resize_and_crop(group), strict=True):
            out[i] = image
    return out


@dataclass(frozen=True)
class EncodedJpeg:
    data: torch.Tensor  # 1-D uint8 on the CPU (may share the payload slot's memory)
    orientation: int


# The libraries that decode a batch of JPEGs on the device (``device_jpeg_library``).
# torchvision's nvjpeg ships with torchvision; nvImageCodec is optional (PyPI
# ``nvidia-nvimgcodec-cu13`` with ``nvidia-nvjpeg``) and can use the GPU's hardware
# JPEG decoder. ``make bench-gpu`` checks and times both (docs/BENCHMARKS.md).
LIBRARIES = ("torchvision", "nvimgcodec")

Decoded = torch.Tensor | DecodeError  # a CHW uint8 image on the device, or why not


class JpegBatchDecoder:
    def __init__(
        self, device: torch.device | str, library: str = "torchvision", backend: str | None = None
    ) -> None:
        """``backend``: nvImageCodec's backend kind by name (``hw_gpu_only``, ``gpu_only``,
        ``hybrid_cpu_gpu``, ``cpu_only``); None, its own choice."""
        self.device = torch.device(device)
        if library == "torchvision":
            self._library: _Torchvision | _NvImageCodec = _Torchvision(self.device)
        elif library == "nvimgcodec":
            self._library = _NvImageCodec(self.device, backend)
        else:
            raise ValueError(f"unknown device JPEG library {library!r}; expected {LIBRARIES}")

    def decode(self, images: list[EncodedJpeg]) -> list[Decoded]:
        """3x224x224 uint8 tensors on the device, or the error of each image that failed."""
        if not images:
            return []
        decoded = self.decode_full_size(images)
        rows = [i for i, d in enumerate(decoded) if not isinstance(d, DecodeError)]
        oriented = [orient(decoded[i], images[i].orientation) for i in rows]  # type: ignore[arg-type]
        for i, image in zip(rows, resize_and_crop_all(oriented), strict=True):
            decoded[i] = image
        return decoded

    def decode_full_size(self, images: list[EncodedJpeg]) -> list[Decoded]:
        """The library's decode alone: CHW images as stored, neither oriented nor resized."""
        return self._library.decode([image.data for image in images])


def _wait_for(device: torch.device) -> None:
    if device.type == "cuda":
        # A decoder may still be writing on a stream of its own when its call returns
        # (pytorch/vision PR 9606: corrupted tensors); wait for it before reading.
        torch.cuda.synchronize(device)


class _Torchvision:
    """``torchvision.io.decode_jpeg``: nvjpeg on CUDA, libjpeg on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def decode(self, data: list[torch.Tensor]) -> list[Decoded]:
        try:
            return list(self._decode(data))
        except RuntimeError:
            # One bad image fails the whole batched call: find it by decoding one by one.
            return [self._decode_one(d) for d in data]

    def _decode(self, data: list[torch.Tensor]) -> list[torch.Tensor]:
        with warnings.catch_warnings():
            # torchvision 0.29 points to TorchCodec for future releases; this one works.
            warnings.simplefilter("ignore", DeprecationWarning)
            result = decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
        _wait_for(self.device)
        return result if isinstance(result, list) else [result]

    def _decode_one(self, data: torch.Tensor) -> Decoded:
        try:
            return self._decode([data])[0]
        except RuntimeError as exc:
            return DecodeError(f"device JPEG decode failed: {exc}", reason="corrupt")


class _NvImageCodec:
    """nvImageCodec: its hardware, CUDA or CPU decoders, whichever it finds; planar RGB out.

    On the CPU it runs its libjpeg-turbo decoder alone, which is how it is tested
    without a GPU. The EXIF orientation is left to ``orient``, as for torchvision."""

    def __init__(self, device: torch.device, backend: str | None = None) -> None:
        try:
            from nvidia import nvimgcodec
        except ImportError as exc:
            raise ConfigError(
                "device_jpeg_library nvimgcodec needs nvImageCodec: pip install"
                " nvidia-nvimgcodec-cu13 nvidia-nvjpeg"
            ) from exc
        self.device = device
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            backends = (
                None
                if backend is None
                else [nvimgcodec.Backend(getattr(nvimgcodec.BackendKind, backend.upper()))]
            )
            self._decoder = nvimgcodec.Decoder(device_id=index, backends=backends)
        else:
            self._decoder = nvimgcodec.Decoder(
                device_id=nvimgcodec.NVIMGCODEC_DEVICE_CPU_ONLY,
                backends=[nvimgcodec.Backend(nvimgcodec.CPU_ONLY)],
            )
        self._params = nvimgcodec.DecodeParams(
            apply_exif_orientation=False,
            color_spec=nvimgcodec.ColorSpec.SRGB,
            sample_format=nvimgcodec.SampleFormat.P_RGB,  # CHW, grey expanded to RGB
        )

    def decode(self, data: list[torch.Tensor]) -> list[Decoded]:
        stream = (
            torch.cuda.current_stream(self.device).cuda_stream if self.device.type == "cuda" else 0
        )
        images = self._decoder.decode(
            [d.numpy() for d in data], params=self._params, cuda_stream=stream
        )
        _wait_for(self.device)
        return [
            DecodeError("device JPEG decode failed (nvImageCodec)", reason="corrupt")
            if image is None
            else self._tensor(image)
            for image in images
        ]

    def _tensor(self, image: Any) -> torch.Tensor:
        # Either way the tensor shares the image's memory and keeps it alive.
        if self.device.type == "cuda":
            return torch.from_dlpack(image)
        return torch.from_numpy(np.asarray(image))
