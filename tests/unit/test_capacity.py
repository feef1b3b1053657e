"""The capacity model's arithmetic, its edge cases, and the ``streamer capacity`` command line."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import pytest

from streamer import capacity
from streamer.kafka.records import OutputEvent
from streamer.schemas import Label, ModelInfo, Prediction, Source
from streamer.tools import capacity as tool
from streamer.vision.models import imagenet_labels

pytestmark = pytest.mark.timeout(30)


def run_tool(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``streamer capacity ARGV`` through the tool's own parser hook."""
    parser = argparse.ArgumentParser(prog="streamer")
    add = parser.add_subparsers(dest="command")
    tool.add_parser(add)
    try:
        args = parser.parse_args(["capacity", *argv])
        code = args.func(args)
    except SystemExit as exited:
        code = exited.code
    out, err = capsys.readouterr()
    return int(code or 0), out, err


BENCH = {
    "ceiling": {"images_per_s": 28.74},
    "engine": {"images_per_s": 21.86, "mean_decode_ms": 6.3, "decode_workers": 1},
    "e2e": {"images_per_s": 21.91},
}


# --- the model ----------------------------------------------------------------------------


def test_per_instance_rate_is_the_slowest_stage() -> None:
    assert capacity.per_instance_rate(
        {"fetch": 900, "decode": 150, "model": 28, "produce": 500}
    ) == (
        "model",
        28,
    )


@pytest.mark.parametrize("rates", [{}, {"model": 0.0}, {"model": -1.0}, {"model": math.inf}])
def test_per_instance_rate_refuses_nonsense(rates: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        capacity.per_instance_rate(rates)


def test_stage_rates_from_bench_map_the_stages() -> None:
    rates = capacity.stage_rates_from_bench(BENCH)
    assert rates == pytest.approx(
        {"model": 28.74, "engine": 21.86, "decode": 1000 / 6.3, "end_to_end": 21.91}
    )
    # The engine (decode and model sharing the cores) binds here, not the model alone.
    assert capacity.per_instance_rate(rates) == ("engine", 21.86)


def test_stage_rates_from_a_gpu_run_without_kafka_figures() -> None:
    gpu = {"ceiling": {"images_per_s": 3000.0}, "engine": {"images_per_s": 2100.0}}
    assert capacity.per_instance_rate(capacity.stage_rates_from_bench(gpu)) == ("engine", 2100.0)


def test_stage_rates_from_bench_without_figures_is_an_error() -> None:
    with pytest.raises(ValueError, match="no ceiling"):
        capacity.stage_rates_from_bench({"machine": {}})


@pytest.mark.parametrize(
    ("rate", "mu", "u", "expected"),
    [
        (14.0, 20.0, 0.7, 1),  # exactly u x mu: float noise must not add an instance
        (14.01, 20.0, 0.7, 2),
        (120.0, 21.9, 0.7, 8),  # 120 / 15.33 = 7.83
        (0.0, 10.0, 0.7, 1),  # no load still keeps one instance
        (100.0, 10.0, 1.0, 10),
    ],
)
def test_instances_needed(rate: float, mu: float, u: float, expected: int) -> None:
    assert capacity.instances_needed(rate, mu, u) == expected


@pytest.mark.parametrize("u", [0.0, -0.1, 1.01, math.nan])
def test_utilisation_outside_0_1_is_refused(u: float) -> None:
    with pytest.raises(ValueError, match="utilisation"):
        capacity.instances_needed(10, 10, u)


def test_partitions_are_twice_the_largest_scale() -> None:
    assert capacity.partitions_needed(8) == 16


@pytest.mark.parametrize(
    ("instances", "partitions", "share"),
    [
        (3, 6, 1 / 3),  # even split
        (4, 6, 2 / 6),  # two instances read 2 partitions: 4 instances are worth 3
        (3, 2, 1 / 2),  # the third instance idles
        (5, None, 1 / 5),  # no partition count: even split assumed
    ],
)
def test_busiest_share(instances: int, partitions: int | None, share: float) -> None:
    assert capacity.busiest_share(instances, partitions) == pytest.approx(share)
    assert capacity.effective_instances(instances, partitions) == pytest.approx(1 / share)


def test_lag_threshold_is_what_one_instance_clears_within_the_budget() -> None:
    assert capacity.lag_threshold(21.9, 5.0) == 109
    assert capacity.lag_threshold(20.0, 5.0) == 100  # exact product, no float loss
    assert capacity.lag_threshold(0.5, 1.0) == 1  # never 0: KEDA would divide by it
    with pytest.raises(ValueError):
        capacity.lag_threshold(10, 0)


def test_drain_time_is_backlog_over_spare_capacity() -> None:
    # L / (N mu - lambda) = 1000 / (3 x 10 - 12)
    assert capacity.drain_seconds(1000, 12, 10, 3) == pytest.approx(1000 / 18)
    assert capacity.drain_seconds(1000, 12, 10, 3, partitions=6) == pytest.approx(1000 / 18)
    # 4 instances on 6 partitions drain like 3.
    assert capacity.drain_seconds(1000, 12, 10, 4, partitions=6) == pytest.approx(1000 / 18)
    assert capacity.drain_seconds(0, 100, 10, 1) == 0.0


@pytest.mark.parametrize("rate", [30.0, 31.0])
def test_drain_never_ends_when_arrivals_reach_capacity(rate: float) -> None:
    assert math.isinf(capacity.drain_seconds(1000, rate, 10, 3))


def test_broker_bytes() -> None:
    b = capacity.broker_bytes(10, 99_000, 1000, replication_factor=3)
    per_record = 99_000 + capacity.RECORD_OVERHEAD_BYTES + 1000
    assert b["in_bytes_per_s"] == pytest.approx(10 * per_record)
    assert b["out_bytes_per_s"] == pytest.approx(10 * per_record)
    assert b["replication_bytes_per_s"] == pytest.approx(20 * per_record)


def test_claim_check_required_when_the_record_does_not_fit() -> None:
    limit = 1_048_588
    fits = limit - capacity.RECORD_OVERHEAD_BYTES
    assert not capacity.claim_check(fits, limit, 10, 1, 25, 0.5).required
    over = capacity.claim_check(fits + 1, limit, 10, 1, 25, 0.5)
    assert over.required and over.recommended
    assert "max.message.bytes" in over.reasons[0]


def test_claim_check_recommended_beyond_the_nic_fraction_per_gpu() -> None:
    # 1 MB images at 2000/s = 2 GB/s = 16 Gbit/s per GPU; half of a 25 Gbit/s NIC is 12.5.
    image = 1_000_000 - capacity.RECORD_OVERHEAD_BYTES
    one_gpu = capacity.claim_check(image, 10_000_000, 2000, 1, 25, 0.5)
    assert one_gpu.recommended and not one_gpu.required
    assert one_gpu.fetch_bytes_per_s_per_gpu == pytest.approx(2e9)
    # The same instance over 2 GPUs: 8 Gbit/s per GPU, within budget.
    assert not capacity.claim_check(image, 10_000_000, 2000, 2, 25, 0.5).recommended


def test_plan_warns_about_too_few_and_uneven_partitions() -> None:
    p = capacity.plan(capacity.Workload(rate=120, latency_budget_s=5, mu=21.9, partitions=12))
    assert (p.instances, p.partitions_min) == (8, 16)
    assert p.busiest_utilisation == pytest.approx(120 * 2 / 12 / 21.9)
    assert any("fewer than 2 x 8 = 16" in w for w in p.warnings)
    assert any("do not split evenly" in w for w in p.warnings)


def test_plan_with_enough_partitions_has_no_warning() -> None:
    p = capacity.plan(
        capacity.Workload(rate=60, latency_budget_s=5, mu=20, partitions=10, backlog=1000)
    )
    assert p.instances == 5 and p.warnings == ()
    assert p.drain_s == pytest.approx(1000 / (5 * 20 - 60))


def test_plan_max_instances_drains_faster_and_needs_more_partitions() -> None:
    p = capacity.plan(
        capacity.Workload(rate=60, latency_budget_s=5, mu=20, max_instances=10, backlog=1400)
    )
    assert (p.max_instances, p.partitions_min) == (10, 20)
    assert p.drain_s_at_max == pytest.approx(1400 / (10 * 20 - 60))


def test_prediction_bytes_covers_a_real_top5_prediction() -> None:
    labels = sorted(imagenet_labels(), key=len)[-5:]  # the longest names
    value = Prediction(
        schema_version=1,
        id="x" * 64,
        source=Source(topic="images", partition=11, offset=10**12, timestamp=1_800_000_000_000),
        model=ModelInfo(
            name="resnet18", weights="torchvision:IMAGENET1K_V1", device="cuda:0", precision="fp16"
        ),
        top_k=[Label(index=999, label=name, score=0.123456789) for name in labels],
    ).to_json()
    event = OutputEvent(
        id="0" * 36, source="streamer/streamer", subject="x" * 64, traceparent=b"0" * 55
    )
    headers = sum(len(k) + len(v) for k, v in event.headers())
    assert len(value) + headers <= capacity.PREDICTION_BYTES <= 2 * (len(value) + headers)


# --- the command line ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--rate", "10", "--latency-budget", "5"], "one of the arguments"),
        (
            [
                "--rate",
                "10",
                "--latency-budget",
                "5",
                "--per-instance-rate",
                "2",
                "--stage-rates",
                "model=3",
            ],
            "not allowed with",
        ),
        (
            ["--rate", "-1", "--latency-budget", "5", "--per-instance-rate", "2"],
            "--rate: must be >= 0",
        ),
        (
            ["--rate", "1", "--latency-budget", "0", "--per-instance-rate", "2"],
            "--latency-budget: must be > 0",
        ),
        (
            [
                "--rate",
                "1",
                "--latency-budget",
                "5",
                "--per-instance-rate",
                "2",
                "--utilisation",
                "0",
            ],
            "--utilisation: must be in (0, 1]",
        ),
        (
            [
                "--rate",
                "1",
                "--latency-budget",
                "5",
                "--per-instance-rate",
                "2",
                "--utilisation",
                "1.5",
            ],
            "--utilisation: must be in (0, 1]",
        ),
        (
            ["--rate", "x", "--latency-budget", "5", "--per-instance-rate", "2"],
            "'x' is not a number",
        ),
        (
            ["--rate", "1", "--latency-budget", "5", "--per-instance-rate", "nan"],
            "--per-instance-rate: must be > 0",
        ),
        (["--rate", "1", "--latency-budget", "5", "--stage-rates", "gpu=3"], "NAME one of fetch"),
        (
            [
                "--rate",
                "1",
                "--latency-budget",
                "5",
                "--per-instance-rate",
                "2",
                "--partitions",
                "0",
            ],
            "an integer >= 1",
        ),
    ],
)
def test_bad_input_is_a_usage_error(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_tool(argv, capsys)
    assert code == 2 and out == ""
    assert message in err


def test_plan_from_bench_results_as_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    results = tmp_path / "results.json"
    results.write_text(json.dumps(BENCH))
    argv = ["--rate", "100", "--latency-budget", "2", "--from-bench", str(results)]
    code, out, _ = run_tool([*argv, "--partitions", "12", "--format", "json"], capsys)
    assert code == 0
    data: dict[str, Any] = json.loads(out)
    assert data["mu"]["binding_stage"] == "engine"
    assert data["instances"] == math.ceil(100 / (0.7 * 21.86))
    assert data["lag_threshold"] == 43
    assert data["drain_s"] is None and data["drain_never"] is False


def test_unusable_bench_results_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    results = tmp_path / "results.json"
    results.write_text("{}")
    code, _, err = run_tool(
        ["--rate", "1", "--latency-budget", "1", "--from-bench", str(results)], capsys
    )
    assert code == 2
    assert err.startswith("streamer capacity: ") and "not usable benchmark results" in err


def test_a_backlog_that_never_drains_says_never(capsys: pytest.CaptureFixture[str]) -> None:
    # One partition: however many instances, one reads everything, at 20 < 30 records/s.
    argv = ["--rate", "30", "--latency-budget", "5", "--per-instance-rate", "20"]
    code, out, _ = run_tool([*argv, "--partitions", "1", "--backlog", "100"], capsys)
    assert code == 0
    assert "never" in out and "warning: the backlog never drains" in out
    code, out, _ = run_tool(
        [*argv, "--partitions", "1", "--backlog", "100", "--format", "json"], capsys
    )
    data = json.loads(out)
    assert data["drain_s"] is None and data["drain_never"] is True
