"""The null model (``--weights null``): fixed scores, computed from nothing."""

from __future__ import annotations

import pytest
import torch

from streamer.errors import ConfigError
from streamer.vision.classifier import Classifier, InferenceConfig
from streamer.vision.models import WeightsSpec

pytestmark = pytest.mark.timeout(60)


def test_null_parses_and_a_typo_names_it() -> None:
    assert WeightsSpec.parse("null").kind == "null"
    with pytest.raises(ConfigError, match="'null'"):
        WeightsSpec.parse("nul")


def test_every_image_gets_the_same_scores_whatever_its_pixels() -> None:
    classifier = Classifier(InferenceConfig(WeightsSpec.parse("null"), top_k=3))
    assert classifier.weights_identity == "null"
    noise = torch.randint(0, 256, (4, 3, 224, 224), dtype=torch.uint8)
    result = classifier.classify(noise)
    assert result.indices == [[0, 1, 2]] * 4
    assert len({tuple(s) for s in result.scores}) == 1
    assert result.scores[0][0] > result.scores[0][1] > result.scores[0][2] > 0
    assert (
        classifier.classify(torch.zeros((2, 3, 224, 224), dtype=torch.uint8)).scores
        == (result.scores[:2])
    )


def test_the_null_model_does_no_arithmetic_on_the_pixels(monkeypatch) -> None:
    """The pixels are never converted to floats: that is the work being left out."""
    classifier = Classifier(InferenceConfig(WeightsSpec.parse("null")))
    pixels = torch.zeros((2, 3, 224, 224), dtype=torch.uint8)

    def refuse(*args, **kwargs):
        raise AssertionError("the null model converted the pixels")

    monkeypatch.setattr(torch.Tensor, "float", refuse)
    assert len(classifier.classify(pixels).indices) == 2


def test_the_batch_time_table_has_a_forward_time_per_size() -> None:
    classifier = Classifier(InferenceConfig(WeightsSpec.parse("random:0"), threads=1))
    table = classifier.time_batches((1, 2))
    assert sorted(table) == [1, 2] and all(t > 0 for t in table.values())
    assert classifier.time_batches(()) == {}
