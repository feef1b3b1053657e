"""The multi-instance benchmark stage's figures, settings and summary (no broker, no service)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
from prometheus_client import generate_latest

from streamer import cli
from streamer.bench import report
from streamer.bench.scale import (
    group_state,
    instance_settings,
    lag_of,
    model_prediction,
    predicted_total,
    steady_rate,
)
from streamer.bench.workload import STAGES, BenchConfig
from streamer.config import Settings
from streamer.metrics import Metrics
from streamer.tools.bench import config_from_args

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(autouse=True)
def no_streamer_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in Settings.model_fields:
        monkeypatch.delenv(f"STREAMER_{name.upper()}", raising=False)


def test_the_scale_stage_is_not_in_the_default_run() -> None:
    assert "scale" not in BenchConfig.full().stages
    assert "scale" not in STAGES


def test_instances_share_a_group_and_are_small() -> None:
    config = BenchConfig.full()
    fleet = [instance_settings(config, "bench-x-n3", i) for i in range(3)]
    assert {s.group_id for s in fleet} == {"bench-x-n3"}
    assert len({s.client_id for s in fleet}) == 3
    assert len({s.metrics_port for s in fleet}) == 3
    for s in fleet:
        assert (s.decode_workers, s.max_in_flight, s.inference_threads) == (1, 32, 1)
        assert s.inference_standby is False
        assert s.weights == "random:0"
        assert s.include_timings  # the stage reads append times and batch sizes


def test_lag_counts_uncommitted_partitions_from_their_start() -> None:
    ends = {0: 100, 1: 50, 2: 0}
    assert lag_of({0: 90, 1: 50}, ends) == 10 + 0 + 0
    assert lag_of({}, ends) == 150
    assert lag_of({0: 100, 1: 50, 2: 0}, ends) == 0


@dataclass
class FakeResponse:
    groups: list[dict[str, Any]]

    def to_object(self) -> dict[str, Any]:
        return {"groups": self.groups}


def test_group_state_reads_the_describe_response() -> None:
    described = [
        FakeResponse([{"group": "other", "state": "Empty", "members": []}]),
        FakeResponse([{"group": "g", "state": "Stable", "members": [{}, {}]}]),
    ]
    assert group_state(described, "g") == ("Stable", 2)
    assert group_state(described, "absent") == ("Unknown", 0)


def test_predicted_total_reads_the_service_metrics_page() -> None:
    metrics = Metrics()
    metrics.records_predicted.labels("out-a").inc(7)
    metrics.records_predicted.labels("out-b").inc(3)
    page = generate_latest(metrics.registry).decode()
    assert predicted_total(page, "out-a") == 7
    assert predicted_total(page, "missing") == 0


def test_steady_rate_leaves_out_start_up_and_the_tail() -> None:
    # 10/s in the middle; a slow start (model loading) and a slow tail around it.
    times = [0.0, 5.0] + [10 + i / 10 for i in range(101)] + [30.0, 40.0]
    rate = steady_rate(times, head=2, tail=2)
    assert rate["images_per_s"] == pytest.approx(10.0)
    assert rate["counted"] == 101
    assert steady_rate(times, head=0, tail=0)["images_per_s"] < 4


def test_steady_rate_with_few_records_keeps_at_least_two() -> None:
    assert steady_rate([1.0, 2.0, 3.0], head=32, tail=32)["images_per_s"] == pytest.approx(1.0)
    assert steady_rate([1.0], head=0, tail=0)["images_per_s"] == 0.0


def test_model_prediction_accounts_for_uneven_partitions() -> None:
    # 4 instances on 6 partitions: two read 2 partitions, so the group is worth 3.
    m = model_prediction(mu=10.0, instances=4, partitions=6, backlog=600)
    assert m["effective_instances"] == pytest.approx(3.0)
    assert m["aggregate_per_s"] == pytest.approx(30.0)
    assert m["drain_s"] == pytest.approx(20.0)
    assert model_prediction(0.0, 1, 6, 600)["drain_s"] is None


def step(n: int, rate: float, drain: float) -> dict[str, Any]:
    return {
        "instances": n,
        "partitions": 6,
        "records": 900,
        "ready_s": [20.0] * n,
        "group_stable_s": 25.0,
        "lag_drain_s": drain,
        "aggregate": {"images_per_s": rate},
        "share_by_instance": [1 / n] * n,
        "model": model_prediction(13.0, n, 6, 900),
        "measured_vs_model": rate / (13.0 * n),
    }


def test_summary_shows_the_scale_rows_next_to_the_model() -> None:
    results = {
        "machine": {"cpu_model": "x", "cores": 2, "ram_bytes": 2**34, "gpu": None},
        "config": {"precision": "fp32", "weights": "random:0"},
        "targets": {},
        "scale": {
            "bootstrap_servers": "127.0.0.1:19092,127.0.0.1:19093,127.0.0.1:19094",
            "replication_factor": 3,
            "cores": 2,
            "settings_per_instance": {
                "decode_workers": 1,
                "max_in_flight": 32,
                "inference_threads": 1,
                "inference_standby": False,
                "weights": "random:0",
            },
            "steps": [step(1, 13.0, 70.0), step(2, 22.0, 42.0)],
        },
    }
    text = report.summary_table(results)
    assert "| 1 | 6 | 900 | 13.00 img/s | 13.00 img/s | 1.00 | 100% |" in text
    assert (
        "| 2 | 6 | 900 | 22.00 img/s | 26.00 img/s | 0.85 | 50% / 50% | 42.0 s | 34.6 s |" in text
    )


def test_the_documented_command_selects_the_full_scale_stage() -> None:
    bootstrap = "127.0.0.1:19092,127.0.0.1:19093,127.0.0.1:19094"
    args = cli.build_parser().parse_args(
        ["bench", "--stages", "scale", "--bootstrap-servers", bootstrap]
    )
    config = config_from_args(args)
    assert config.stages == ("scale",)
    assert config.bootstrap_servers == bootstrap
    assert (config.scale_instances, config.scale_partitions, config.scale_records) == (
        (1, 2, 3),
        6,
        900,
    )


def test_the_services_log_at_warning_unless_the_bench_is_told_otherwise() -> None:
    from streamer.bench.workload import service_settings

    quiet = config_from_args(cli.build_parser().parse_args(["bench", "--stages", "e2e"]))
    assert service_settings(quiet, "p").log_level == "WARNING"
    args = ["bench", "--stages", "e2e,latency", "--service-log-level", "DEBUG"]
    debug = config_from_args(cli.build_parser().parse_args(args))
    assert service_settings(debug, "p").log_level == "DEBUG"


def test_the_batches_in_flight_reach_the_benchmarked_service() -> None:
    from streamer.bench.workload import service_settings

    default = config_from_args(cli.build_parser().parse_args(["bench", "--gpu"]))
    assert service_settings(default, "p").batches_in_flight_per_device == 2
    args = ["bench", "--gpu", "--batches-in-flight", "3"]
    three = config_from_args(cli.build_parser().parse_args(args))
    assert service_settings(three, "p").batches_in_flight_per_device == 3
