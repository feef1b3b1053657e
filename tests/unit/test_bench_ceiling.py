"""The model ceiling of several inference workers side by side (streamer/bench/ceiling.py)."""

from __future__ import annotations

from typing import Any

import pytest

from streamer.bench import ceiling
from streamer.bench.ceiling import best_of, run_ceiling_workers

pytestmark = pytest.mark.timeout(180)


def test_two_workers_sweep_together_over_one_window() -> None:
    sweep = run_ceiling_workers(2, "random:0", "fp32", 1, (1, 2), 0.3)
    assert sweep["workers"] == 2 and sweep["threads"] == 1
    for row in sweep["by_batch_size"].values():
        assert (row["workers"], row["threads"]) == (2, 1)
        assert row["passes"] >= 4  # MIN_PASSES each: none stops before the other has them
        # Every pass counted ran while the other worker was still passing: one that
        # finishes first leaves none of the other's passes uncontended.
        windows, ran_until = row["windows"], row["ran_until"]
        assert len(windows) == len(ran_until) == 2
        for mine, (start, end) in enumerate(windows):
            for other, until in enumerate(ran_until):
                if other != mine:
                    assert end <= until
                    assert start < windows[other][1]
    best = sweep["by_batch_size"][str(sweep["best_batch_size"])]
    assert sweep["images_per_s"] == best["images_per_s"]


def test_a_worker_that_fails_is_an_error_not_a_hang() -> None:
    with pytest.raises(RuntimeError, match="a ceiling worker failed"):
        run_ceiling_workers(2, "/nonexistent/weights.pt", "fp32", 1, (1,), 0.1)


def test_workers_that_stop_answering_are_an_error_not_a_hang(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Workers told to time each size for an hour never answer within the limit.
    monkeypatch.setattr(ceiling, "ANSWER_TIMEOUT_S", 3.0)
    with pytest.raises(RuntimeError, match="no ceiling worker answered"):
        run_ceiling_workers(2, "random:0", "fp32", 1, (1,), 3600.0)


def row(images_per_s: float, workers: int, threads: int) -> dict[str, Any]:
    return {"images_per_s": images_per_s, "forward_s": 1.0, "workers": workers, "threads": threads}


def sweep(workers: int, threads: int, rates: dict[str, float]) -> dict[str, Any]:
    by_batch = {size: row(rate, workers, threads) for size, rate in rates.items()}
    best = max(by_batch, key=lambda k: by_batch[k]["images_per_s"])
    return {
        "workers": workers,
        "threads": threads,
        "by_batch_size": by_batch,
        "best_batch_size": int(best),
        "images_per_s": by_batch[best]["images_per_s"],
    }


def test_across_layouts_each_size_keeps_its_fastest_and_the_ceiling_names_its_layout() -> None:
    one = sweep(1, 2, {"4": 40.0, "8": 36.0})
    two = sweep(2, 1, {"4": 39.0, "8": 41.0})
    merged = best_of([one, two])
    assert merged["by_batch_size"]["4"]["workers"] == 1
    assert merged["by_batch_size"]["8"]["workers"] == 2
    assert (merged["images_per_s"], merged["best_batch_size"]) == (41.0, 8)
    assert (merged["workers"], merged["threads"]) == (2, 1)
    assert best_of([two, one])["images_per_s"] == 41.0  # whichever comes first
