"""Before any GPU figure: do JPEGs decoded on the device give the CPU path's answers?

A public report (pytorch/vision PR 9606) shows ``decode_jpeg(device="cuda")``
writing into memory the caller's CUDA stream was still reading: 199 of 200 runs of
its reproducer gave corrupted tensors. A decoder like that must never be measured,
let alone be the default. So ``make bench-gpu`` runs this check first and stops the
benchmark when it fails. For every image of the corpus, ``rounds`` times over, in
the batches the service uses (``vision.device_decode.JpegBatchDecoder``, then the
service's ``Classifier`` on the same device):

- **pixels**: the mean absolute difference from the exact CPU decode
  (``vision.decode``) is at most ``MAX_MEAN_LEVELS`` (the two IDCTs and resizes
  differ by a level or two; a corrupted image by tens);
- **determinism**: every round gives the same pixels as the first (a race does not);
- **answers**: the top-5 classes are those of the CPU-decoded pixels, in order, where
  only classes whose CPU scores tie (within ``TIE``) may swap.

Any failure raises ``DeviceDecodeMismatch`` naming the images. The same code runs
with ``device="cpu"`` (tests/unit/test_device_check.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from streamer.vision.classifier import Classifier, InferenceConfig
from streamer.vision.decode import DecodeLimits, decode, open_image, probe
from streamer.vision.device_decode import EncodedJpeg, JpegBatchDecoder
from streamer.vision.models import WeightsSpec

MAX_MEAN_LEVELS = 2.0  # mean |device - CPU| per pixel, in 0-255 levels
TOP = 5
# CPU-path scores closer than this are a tie: the device may rank those classes either
# way. Seen on an H200 (docs/BENCHMARKS.md): nvjpeg's pixels, 0.49 levels from the CPU
# path's, swapped ranks 2 and 3 of one image whose CPU scores were both 0.02331.
TIE = 1e-4

Decoder = Callable[[list[EncodedJpeg]], list[Any]]


class DeviceDecodeMismatch(RuntimeError):
    """Device-decoded images differ from the CPU path: no GPU figure may be taken."""


def encoded(image: bytes) -> EncodedJpeg:
    orientation = probe(open_image(image, DecodeLimits())) or 1
    return EncodedJpeg(torch.frombuffer(bytearray(image), dtype=torch.uint8), orientation)


def same_ranking(device_top: list[int], cpu_top: list[int], cpu_scores: list[float]) -> bool:
    """The CPU path's top-k in its order, where classes tied on the CPU may come either way.

    Each rank must hold a class of the CPU top-k whose CPU score is within ``TIE`` of the
    score the CPU path has at that rank."""
    score = dict(zip(cpu_top, cpu_scores, strict=True))
    return len(device_top) == len(cpu_top) and all(
        c in score and abs(score[c] - cpu_scores[rank]) <= TIE for rank, c in enumerate(device_top)
    )


def check(
    images: list[bytes],
    device: str,
    weights: str = "random:0",
    rounds: int = 5,
    batch: int = 64,
    decoder: Decoder | None = None,
) -> dict[str, Any]:
    """Check ``images`` (JPEGs) ``rounds`` times; raise ``DeviceDecodeMismatch`` on any
    failure, else return the figures (largest mean difference, top-5 agreement)."""
    decode_batch = decoder or JpegBatchDecoder(device).decode
    classifier = Classifier(InferenceConfig(WeightsSpec.parse(weights), device, "fp32", TOP))
    cpu_pixels = torch.stack([torch.from_numpy(decode(image)) for image in images])
    cpu = classifier.classify(cpu_pixels)
    cpu_top = cpu.indices
    first: dict[int, torch.Tensor] = {}  # each image's pixels in round 1
    problems: dict[int, str] = {}
    worst = 0.0
    for round_ in range(rounds):
        for start in range(0, len(images), batch):
            rows = range(start, min(start + batch, len(images)))
            out = decode_batch([encoded(images[i]) for i in rows])
            failed = [i for i, pixels in zip(rows, out, strict=True) if not torch.is_tensor(pixels)]
            for i in failed:
                problems.setdefault(i, f"the device could not decode it: {out[i - start]}")
            pixels = torch.stack(
                [p if torch.is_tensor(p) else torch.zeros_like(cpu_pixels[0]) for p in out]
            ).to("cpu")
            diff = (pixels.float() - cpu_pixels[start : start + len(out)].float()).abs()
            means = diff.flatten(1).mean(1)
            top = classifier.classify(pixels).indices
            for offset, i in enumerate(rows):
                if i in failed:
                    continue
                mean = float(means[offset])
                worst = max(worst, mean)
                if mean > MAX_MEAN_LEVELS:
                    problems.setdefault(i, f"corrupted: mean difference {mean:.1f} levels")
                if round_ == 0:
                    first[i] = pixels[offset]
                elif not torch.equal(pixels[offset], first[i]):
                    problems.setdefault(i, f"round {round_ + 1} decoded other pixels than round 1")
                if not same_ranking(top[offset], cpu_top[i], cpu.scores[i]):
                    problems.setdefault(
                        i,
                        f"top-5 {top[offset]} where the CPU path gives {cpu_top[i]} (scores"
                        f" {', '.join(f'{s:.5f}' for s in cpu.scores[i])}; mean difference"
                        f" {mean:.2f} levels)",
                    )
    if problems:
        listed = "; ".join(f"image {i}: {why}" for i, why in sorted(problems.items())[:10])
        raise DeviceDecodeMismatch(
            f"{len(problems)} of {len(images)} images decoded on {device} differ from the CPU "
            f"path ({rounds} rounds): {listed}"
        )
    return {
        "device": device,
        "images": len(images),
        "rounds": rounds,
        "max_mean_difference_levels": worst,
        "top5_agreement": 1.0,
        "deterministic": True,
    }
