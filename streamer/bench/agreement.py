"""How far a reduced precision's answers are from fp32's, on the benchmark corpus.

Reported next to the speed of bf16 (or fp16): the fraction of images whose top-1
class is the same as in fp32, and the largest difference of any class's softmax
score. Both models run the service's own ``Classifier`` on the same decoded pixels.
"""

from __future__ import annotations

from typing import Any

import torch

from streamer.vision.classifier import Classifier, InferenceConfig
from streamer.vision.decode import decode
from streamer.vision.models import WeightsSpec

CLASSES = 1000


def scores_by_class(classifier: Classifier, pixels: torch.Tensor) -> torch.Tensor:
    """N x 1000 softmax scores, from a classifier configured with top_k=1000."""
    result = classifier.classify(pixels)
    scores = torch.zeros((len(result.indices), CLASSES))
    for row, (indices, values) in enumerate(zip(result.indices, result.scores, strict=True)):
        scores[row, torch.tensor(indices)] = torch.tensor(values)
    return scores


def agreement(
    weights: str, precision: str, images: list[bytes], device: str = "cpu", batch: int = 16
) -> dict[str, Any]:
    spec = WeightsSpec.parse(weights)
    reference = Classifier(InferenceConfig(spec, device, "fp32", top_k=CLASSES))
    reduced = Classifier(InferenceConfig(spec, device, precision, top_k=CLASSES))
    pixels = torch.stack([torch.from_numpy(decode(image)) for image in images])
    same_top1, max_diff = 0, 0.0
    for start in range(0, len(pixels), batch):
        chunk = pixels[start : start + batch]
        a, b = scores_by_class(reference, chunk), scores_by_class(reduced, chunk)
        same_top1 += int((a.argmax(1) == b.argmax(1)).sum())
        max_diff = max(max_diff, float((a - b).abs().max()))
    return {
        "precision": precision,
        "images": len(pixels),
        "top1_agreement": same_top1 / len(pixels),
        "max_score_difference": max_diff,
    }
