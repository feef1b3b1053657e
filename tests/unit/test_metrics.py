"""The service's registry: the standard process_* families next to streamer_*, and the
stage histogram that exports what a prometheus_client Histogram does."""

from __future__ import annotations

import os

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from streamer.metrics import LATENCY_BUCKETS, STAGES, Metrics

pytestmark = pytest.mark.timeout(10)

PROCESS_SAMPLES = (
    "process_cpu_seconds_total",
    "process_resident_memory_bytes",
    "process_open_fds",
    "process_start_time_seconds",
)


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="process_* needs /proc")
def test_every_registry_exports_the_process_metrics() -> None:
    # Two registries in one process: each gets its own collectors, no clash.
    first, second = Metrics(), Metrics()
    for metrics in (first, second):
        text = generate_latest(metrics.registry).decode()
        samples = {
            sample.name: sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }
        for name in PROCESS_SAMPLES:
            assert name in samples, name
        assert samples["process_resident_memory_bytes"] > 0
        assert "streamer_ready" in samples


def _samples(registry: CollectorRegistry, family: str) -> dict[tuple[str, tuple], float]:
    text = generate_latest(registry).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for parsed in text_string_to_metric_families(text)
        if parsed.name == family
        for sample in parsed.samples
        if not sample.name.endswith("_created")
    }


def test_the_stage_histogram_exports_what_a_prometheus_histogram_does() -> None:
    # Values on the bucket bounds (le includes them), between, beyond the last, zero,
    # and a negative time (a clock step), which counts as zero.
    values = {
        "decode": [0.0005, 0.0007, 0.001, 0.0011, 60.0, 61.0, 0.0, -0.2, 0.25],
        "inference": [0.1, 0.1, 0.099, 5.0],
    }
    reference_registry = CollectorRegistry()
    reference = Histogram(
        "streamer_stage_seconds",
        "Time a record spends in each stage.",
        ["stage"],
        buckets=LATENCY_BUCKETS,
        registry=reference_registry,
    )
    for stage in STAGES:
        reference.labels(stage)  # every stage is exported from the start
    metrics = Metrics()
    for stage, seconds in values.items():
        for value in seconds:
            reference.labels(stage).observe(max(value, 0.0))
            metrics.observe_stage(stage, value)

    ours = _samples(metrics.registry, "streamer_stage_seconds")
    assert ours == _samples(reference_registry, "streamer_stage_seconds")
    assert ours[("streamer_stage_seconds_count", (("stage", "decode"),))] == 9
    assert ours[("streamer_stage_seconds_bucket", (("le", "0.0005"), ("stage", "decode")))] == 3
    assert ours[("streamer_stage_seconds_count", (("stage", "kafka"),))] == 0
