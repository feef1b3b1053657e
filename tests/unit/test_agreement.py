"""The bf16-against-fp32 agreement the benchmark reports next to bf16's speed."""

from __future__ import annotations

import pytest

from streamer.bench.agreement import agreement
from streamer.bench.workload import payloads

pytestmark = pytest.mark.timeout(120)


def test_fp32_agrees_with_itself_exactly() -> None:
    result = agreement("random:0", "fp32", payloads(4), batch=2)
    assert result == {
        "precision": "fp32",
        "images": 4,
        "top1_agreement": 1.0,
        "max_score_difference": 0.0,
    }


def test_bf16_is_measured_against_fp32() -> None:
    result = agreement("random:0", "bf16", payloads(4), batch=4)
    assert result["images"] == 4
    assert 0.0 <= result["top1_agreement"] <= 1.0
    # bf16 keeps 8 bits of mantissa: scores move, but far less than a whole score.
    assert 0.0 < result["max_score_difference"] < 0.5
