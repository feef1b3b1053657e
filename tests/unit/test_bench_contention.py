"""The decode-contention experiment (streamer/bench/contention.py) on a tiny scale."""

from __future__ import annotations

import pytest

from streamer.bench import contention

pytestmark = pytest.mark.timeout(180)


def test_the_decoder_keeps_its_rate_and_both_ceilings_are_measured() -> None:
    (row,) = contention.measure(
        rate=20.0, batch_size=1, threads=1, seconds=1.0, rounds=1, corpus_size=4
    )
    # Paced at 20/s over the ceiling's model load and measurement (free-running, it
    # decodes hundreds a second): at most one image ahead of the pace.
    assert 15 <= row["decoded_per_s"] <= 22
    assert row["decoded"] >= 20 and row["decode_cpu_ms_per_image"] > 0
    assert row["alone_images_per_s"] > 0 and row["beside_images_per_s"] > 0
    assert row["ratio"] == pytest.approx(row["beside_images_per_s"] / row["alone_images_per_s"])
