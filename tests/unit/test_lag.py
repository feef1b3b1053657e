"""The lag arithmetic, the table, and the exporter's series (no broker: a fake reader)."""

from __future__ import annotations

import io

import pytest
from aiokafka.errors import KafkaConnectionError
from prometheus_client import CollectorRegistry

from streamer.kafka.lag import GroupLag, PartitionLag
from streamer.tools.lag import LagExporter, LagMetrics, print_lag

pytestmark = pytest.mark.timeout(30)


def sample(name: str, registry: CollectorRegistry, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


@pytest.mark.parametrize(
    ("committed", "start", "end", "reset", "lag"),
    [
        (40, 0, 100, "earliest", 60),
        (100, 0, 100, "earliest", 0),
        (None, 10, 100, "earliest", 90),  # nothing committed: all still in the log
        (None, 10, 100, "latest", 0),  # nothing committed: starts at the end
        (5, 30, 100, "earliest", 70),  # committed below the log start: those are gone
    ],
)
def test_lag_per_partition(
    committed: int | None, start: int, end: int, reset: str, lag: int
) -> None:
    partition = PartitionLag("t", 0, committed, start, end, reset)  # type: ignore[arg-type]
    assert partition.lag == lag


LAG = GroupLag(
    "g",
    [PartitionLag("in", 0, 3, 0, 10), PartitionLag("in", 1, None, 0, 4)],
    missing_topics=[],
)


def test_table_has_one_row_per_partition_and_a_total() -> None:
    out = io.StringIO()
    print_lag(LAG, "table", out)
    rows = [line.split() for line in out.getvalue().splitlines()]
    assert rows == [
        ["GROUP", "TOPIC", "PARTITION", "COMMITTED", "END", "LAG"],
        ["g", "in", "0", "3", "10", "7"],
        ["g", "in", "1", "-", "4", "4"],
        ["g", "in", "total", "11"],
    ]


def test_json_lines() -> None:
    out = io.StringIO()
    print_lag(LAG, "json", out)
    first = out.getvalue().splitlines()[0]
    assert first == (
        '{"group": "g", "topic": "in", "partition": 0, "committed": 3, "start": 0,'
        ' "end": 10, "lag": 7}'
    )


def test_metrics_follow_each_read_and_drop_partitions_that_went() -> None:
    metrics = LagMetrics("g")
    r = metrics.registry
    assert sample("streamer_group_lag_up", r, group="g") == 0  # nothing read yet
    assert sample("streamer_group_lag_reads_total", r, group="g", result="error") == 0
    metrics.update(LAG)
    assert sample("streamer_group_lag_records", r, group="g", topic="in", partition="0") == 7
    assert sample("streamer_group_lag_records", r, group="g", topic="in", partition="1") == 4
    assert sample("streamer_group_committed_offset", r, group="g", topic="in", partition="0") == 3
    assert (
        sample("streamer_group_committed_offset", r, group="g", topic="in", partition="1") is None
    )
    assert sample("streamer_group_lag_up", r, group="g") == 1
    metrics.update(GroupLag("g", [PartitionLag("in", 0, 10, 0, 10)], missing_topics=["other"]))
    assert sample("streamer_group_lag_records", r, group="g", topic="in", partition="0") == 0
    assert sample("streamer_group_lag_records", r, group="g", topic="in", partition="1") is None
    assert sample("streamer_group_lag_up", r, group="g") == 0  # a topic is missing
    assert sample("streamer_group_lag_reads_total", r, group="g", result="ok") == 2


class FakeReader:
    """Answers each read with the next item: a GroupLag, or an exception to raise."""

    def __init__(self, *answers: GroupLag | Exception) -> None:
        self.group = "g"
        self._answers = list(answers)
        self.stopped = 0

    async def read(self) -> GroupLag:
        answer = self._answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def stop(self) -> None:
        self.stopped += 1


async def test_a_failed_read_keeps_the_last_values_and_marks_them_stale() -> None:
    exporter = LagExporter({}, "g", ["in"], port=0)
    exporter._reader = FakeReader(LAG, KafkaConnectionError("down"), LAG)  # type: ignore[assignment]
    r = exporter.metrics.registry
    assert exporter.not_ready_reason() == "no read yet"
    await exporter.read_once()
    assert exporter.not_ready_reason() is None
    await exporter.read_once()
    assert "reading offsets failed" in (exporter.not_ready_reason() or "")
    assert sample("streamer_group_lag_up", r, group="g") == 0
    assert sample("streamer_group_lag_records", r, group="g", topic="in", partition="0") == 7
    assert sample("streamer_group_lag_reads_total", r, group="g", result="error") == 1
    await exporter.read_once()
    assert sample("streamer_group_lag_up", r, group="g") == 1
    assert exporter.reads == 3
    await exporter.stop()
    await exporter.stop()  # twice is fine
