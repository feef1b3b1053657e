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


def test_the_table_keeps_each_size_s_fastest_of_several_rounds() -> None:
    """In a benchmark, one timed pass per size gave tables whose best size was 4
    in one start and 8 in the next, and 32 in a start where t(1) was 0.045 s against
    0.028 s (something else was loading). One slow pass must not decide the size."""
    from types import SimpleNamespace

    from streamer.pipeline.batch_policy import best_batch_size

    idle = {1: 0.028, 2: 0.043, 4: 0.072, 8: 0.124, 16: 0.27, 32: 0.58}
    passes = {size: [] for size in idle}
    slowed = {(0, 8), (0, 16), (0, 32)}  # the first round's large sizes ran beside a load

    def classify(pixels: torch.Tensor) -> SimpleNamespace:
        size = pixels.shape[0]
        timed_round = len(passes[size]) - (1 if size == 32 else 0)  # 32 also warms up
        passes[size].append(None)
        return SimpleNamespace(forward_s=idle[size] * (1.3 if (timed_round, size) in slowed else 1))

    classifier = Classifier.__new__(Classifier)
    classifier.classify = classify  # type: ignore[method-assign]
    table = classifier.time_batches(tuple(idle))
    assert table == idle
    assert best_batch_size(table) == 8
    assert all(len(runs) >= 3 for size, runs in passes.items() if size != 32)
