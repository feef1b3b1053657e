"""The service's registry: it exports the standard process_* families next to streamer_*."""

from __future__ import annotations

import os

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from streamer.metrics import Metrics

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
