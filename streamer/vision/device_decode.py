"""JPEG decoding on the inference device, batched (nvjpeg on CUDA).

On a GPU, decoding JPEGs on the CPU is what limits throughput long before the
model does. With ``jpeg_decode`` on the device, a decode worker only *probes* a
JPEG (format allow-list, byte and pixel limits, EXIF orientation: header work,
no pixels) and leaves the encoded bytes in the payload slot. The inference
worker then decodes the whole batch's JPEGs in one ``torchvision.io.decode_jpeg``
call on the device, applies the EXIF orientation, resizes the shorter side to
256 (bilinear, antialiased) and centre-crops 224, all on the device.

Every other format, and JPEGs the device decoder cannot take (CMYK, 16-bit),
keep the CPU path. If the batched call fails, each image is decoded on its own;
an image the device cannot decode falls back to the exact CPU path, and only an
image that fails there too becomes a dead letter.

Pixels differ slightly from the CPU path (a different IDCT and a tensor resize
instead of Pillow's), by a few levels at most; tests bound the difference.
The same code runs with ``device="cpu"``, which is how it is tested without a GPU.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as F

from streamer.errors import DecodeError
from streamer.vision.decode import CROP, EXIF_ORIENTATION, probe, resized_size

__all__ = ["EXIF_ORIENTATION", "EncodedJpeg", "JpegBatchDecoder", "orient", "probe"]

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


@dataclass(frozen=True)
class EncodedJpeg:
    data: torch.Tensor  # 1-D uint8 on the CPU (may share the payload slot's memory)
    orientation: int


class JpegBatchDecoder:
    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)

    def decode(self, images: list[EncodedJpeg]) -> list[torch.Tensor | DecodeError]:
        """3x224x224 uint8 tensors on the device, or the error of each image that failed."""
        if not images:
            return []
        data = [image.data for image in images]
        try:
            decoded: list[torch.Tensor | DecodeError] = list(self._decode(data))
        except RuntimeError:
            # One bad image fails the whole batched call: find it by decoding one by one.
            decoded = [self._decode_one(d) for d in data]
        return [
            d if isinstance(d, DecodeError) else resize_and_crop(orient(d, image.orientation))
            for d, image in zip(decoded, images, strict=True)
        ]

    def _decode(self, data: list[torch.Tensor]) -> list[torch.Tensor]:
        with warnings.catch_warnings():
            # torchvision 0.29 points to TorchCodec for future releases; this one works.
            warnings.simplefilter("ignore", DeprecationWarning)
            result = decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
        if self.device.type == "cuda":
            # nvjpeg may still be writing on a stream of its own when decode_jpeg returns
            # (pytorch/vision PR 9606: corrupted tensors); wait for it before reading.
            torch.cuda.synchronize(self.device)
        return result if isinstance(result, list) else [result]

    def _decode_one(self, data: torch.Tensor) -> torch.Tensor | DecodeError:
        try:
            return self._decode([data])[0]
        except RuntimeError as exc:
            return DecodeError(f"device JPEG decode failed: {exc}", reason="corrupt")
