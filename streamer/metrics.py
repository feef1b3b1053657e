"""Every Prometheus metric the service exports, in one place.

Only the main process exports metrics; worker processes report their timings in
their replies and the main process records them here. The registry is injectable
so that tests (and several services in one process) do not share global state.
Names follow Prometheus conventions: ``streamer_`` prefix, base units, ``_total``
for counters, ``_seconds`` and ``_bytes`` for units. No label value ever comes
from input data: labels are topics, partitions, stages and fixed reason codes.

Besides the ``streamer_`` families, every registry carries the standard
``process_*`` families of the main process (CPU seconds, resident memory, open
file descriptors, start time; read from /proc at scrape time, so absent where
there is no /proc) and ``python_info``. Workers are separate processes and are
not included in ``process_*``.
"""

from __future__ import annotations

import bisect
import contextlib
from collections.abc import Iterator
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.metrics_core import HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from streamer.errors import DEAD_LETTER_REASONS

# Buckets for per-stage latencies: 0.5 ms .. 60 s.
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256)
LOOP_LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)

TRANSACTION_RESULTS = (
    "committed",  # outputs and offsets are visible to read_committed consumers
    "retried",  # failed and aborted; the same outputs go into the next transaction
    "fenced",  # another producer took the partition's transactional id
)

STAGES = (
    "kafka",  # record timestamp -> fetched by the consumer
    "permit_wait",  # fetched -> in-flight permit acquired
    "decode",  # decode + preprocess in a decode worker
    "batch_wait",  # decoded -> its batch starts on the inference worker
    "inference",  # forward pass of the batch the record was in
    "produce",  # output (or dead letter) sent -> acked by the broker
    "end_to_end",  # record timestamp -> output acked
)


class Metrics:
    """The service's metrics, bound to one registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        # Collectors bound to this registry only: several Metrics() in one process
        # (tests, the benchmarks) never clash over the global default registry.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self.records_consumed = Counter(
            "streamer_records_consumed_total",
            "Records fetched from the input topic.",
            ["topic"],
            registry=r,
        )
        self.records_predicted = Counter(
            "streamer_records_predicted_total",
            "Predictions acked on the output topic.",
            ["topic"],
            registry=r,
        )
        self.records_dead_lettered = Counter(
            "streamer_records_dead_lettered_total",
            "Dead letters acked, by reason code.",
            ["topic", "reason"],
            registry=r,
        )
        self.record_retries = Counter(
            "streamer_record_retries_total",
            "Records retried after a retriable failure.",
            ["stage"],
            registry=r,
        )
        for stage in ("decode", "inference"):
            self.record_retries.labels(stage)
        self.produce_errors = Counter(
            "streamer_produce_errors_total",
            "Failed output or dead-letter writes (retried).",
            ["topic"],
            registry=r,
        )
        self.producer_recreations = Counter(
            "streamer_producer_recreations_total",
            "Idempotent producers replaced after a sequence error.",
            registry=r,
        )
        self.commits = Counter(
            "streamer_offset_commits_total", "Offset commits, by result.", ["result"], registry=r
        )
        self.transactions = Counter(
            "streamer_transactions_total",
            "Exactly-once transactions (outputs plus input offsets), by result.",
            ["result"],
            registry=r,
        )
        self.transaction_seconds = Histogram(
            "streamer_transaction_seconds",
            "Time to write and commit one exactly-once transaction.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.stage_seconds = StageHistogram(
            "streamer_stage_seconds",
            "Time a record spends in each stage.",
            STAGES,
            LATENCY_BUCKETS,
        )
        r.register(self.stage_seconds)
        # Label children of the per-record metrics: looking one up costs more than using it.
        self._children: dict[tuple[int, str], Any] = {}  # (id(metric), label value) -> child
        self.batch_size = Histogram(
            "streamer_batch_size",
            "Records per inference batch.",
            buckets=BATCH_SIZE_BUCKETS,
            registry=r,
        )
        self.batch_fill_wait = Histogram(
            "streamer_batch_fill_seconds",
            "Time from a batch's first record to the batch being dispatched.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inference_busy = Counter(
            "streamer_inference_busy_seconds_total",
            "Seconds the inference workers spent on answered batches, all workers together;"
            ' divided by streamer_workers_alive{kind="inference"}, its rate is the'
            " share of their time they were busy.",
            registry=r,
        )
        self.batch_size_limit = Gauge(
            "streamer_batch_size_limit",
            "The size limit of the batch being filled: the size the latency-target policy"
            " chose, else the batch-time table's best size (max_batch_size when"
            " batch_size_from_table is off).",
            registry=r,
        )
        self.latency_headroom = Gauge(
            "streamer_latency_target_headroom_seconds",
            "latency_target_ms minus the observed p99 end-to-end latency (negative: the"
            " target is missed); 0 until measured or without a target.",
            registry=r,
        )
        self.in_flight = Gauge(
            "streamer_in_flight_records", "Records holding an in-flight permit.", registry=r
        )
        self.free_permits = Gauge(
            "streamer_free_permits", "In-flight permits available.", registry=r
        )
        self.paused = Gauge(
            "streamer_consumer_paused",
            "1 while the consumer is paused for backpressure.",
            registry=r,
        )
        self.consumer_lag = Gauge(
            "streamer_consumer_lag_records",
            "High watermark minus committed offset.",
            ["topic", "partition"],
            registry=r,
        )
        self.rebalances = Counter(
            "streamer_rebalances_total",
            "Group rebalances that assigned partitions to this instance (its first join"
            " included); a static member's restart adds none on the other instances.",
            registry=r,
        )
        self.committed_offset = Gauge(
            "streamer_committed_offset",
            "Last committed offset per partition.",
            ["topic", "partition"],
            registry=r,
        )
        self.worker_restarts = Counter(
            "streamer_worker_restarts_total",
            "Worker processes replaced after dying, being killed as hung, or recycling"
            " themselves (exit code 75 after repeated failures).",
            ["kind"],
            registry=r,
        )
        self.worker_start_failures = Counter(
            "streamer_worker_start_failures_total",
            "Worker starts that failed (the process died or timed out before it was ready),"
            " by kind and role (main or standby); retried with backoff.",
            ["kind", "role"],
            registry=r,
        )
        self.workers_alive = Gauge(
            "streamer_workers_alive", "Worker processes alive, by kind.", ["kind"], registry=r
        )
        self.loop_lag = Histogram(
            "streamer_event_loop_lag_seconds",
            "How late the event loop runs a scheduled wakeup.",
            buckets=LOOP_LAG_BUCKETS,
            registry=r,
        )
        self.shm_bytes = Gauge(
            "streamer_shared_memory_bytes", "Shared memory reserved for slots.", registry=r
        )
        self.ready = Gauge(
            "streamer_ready",
            "1 when connected to Kafka with the model loaded and warm.",
            registry=r,
        )
        self.partitions_stalled = Gauge(
            "streamer_partitions_stalled",
            "Assigned partitions with records pending and no progress for stall_timeout_s"
            " (/readyz answers 503 while any is).",
            registry=r,
        )
        self.model = Info("streamer_model", "The model being served.", registry=r)
        self.gpu_memory = Gauge(
            "streamer_gpu_memory_bytes",
            "CUDA memory held by the inference worker's tensors.",
            ["device"],
            registry=r,
        )
        self.gpu_utilization = Gauge(
            "streamer_gpu_utilization_ratio",
            "GPU utilisation (0-1) as NVML reports it.",
            ["device"],
            registry=r,
        )

    def declare_topics(self, input_topic: str, output_topic: str, dlq_topic: str) -> None:
        """Export every counter series at 0 before its first event, so rate() counts it."""
        self.records_consumed.labels(input_topic)
        self.records_predicted.labels(output_topic)
        for reason in DEAD_LETTER_REASONS:
            self.records_dead_lettered.labels(dlq_topic, reason)
        for topic in (output_topic, dlq_topic):
            self.produce_errors.labels(topic)
        for result in ("ok", "error", "rebalance"):
            self.commits.labels(result)
        for result in TRANSACTION_RESULTS:
            self.transactions.labels(result)

    def forget_partition(self, topic: str, partition: int) -> None:
        """Drop a partition's series once it is no longer assigned here."""
        for gauge in (self.consumer_lag, self.committed_offset):
            with contextlib.suppress(KeyError):
                gauge.remove(topic, str(partition))

    def count_predicted(self, topic: str) -> None:
        self._child(self.records_predicted, topic).inc()

    def observe_stage(self, stage: str, seconds: float) -> None:
        self.stage_seconds.observe(stage, seconds)

    def _child(self, metric: Any, label: str) -> Any:
        key = (id(metric), label)  # the metrics live as long as this object
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(label)
        return child


class StageHistogram(Collector):
    """A histogram with one label, ``stage``, updated without locks: the seven
    observations every record makes (``STAGES``).

    prometheus_client's ``Histogram`` takes a lock for each of the two values an
    observation updates, for threads this service does not have: stages are observed
    on the event loop, and the metrics server renders on it too (``streamer.http``).
    There it cost 1.7 us per observation, 12 us per record, about 8% of the main
    process's CPU per record on the host path (``streamer bench --stages host
    --profile-host``); here it is a bisect and two additions. The exposition is the
    same as a ``Histogram`` with ``labelnames=["stage"]`` (cumulative ``_bucket``
    series with ``le``, ``_count``, ``_sum``), less the optional ``_created`` series;
    every stage of ``stages`` is exported from the start, at zero.

    One owner: the event loop's thread calls ``observe`` and ``collect``; nothing
    else may.
    """

    def __init__(
        self, name: str, documentation: str, stages: tuple[str, ...], buckets: tuple[float, ...]
    ) -> None:
        self._name = name
        self._documentation = documentation
        self._bounds = sorted(float(b) for b in buckets)
        self._le = [floatToGoString(b) for b in self._bounds] + ["+Inf"]
        # stage -> [count per bucket (the last one: above every bound)], and its sum
        self._counts: dict[str, list[int]] = {}
        self._sums: dict[str, float] = {}
        for stage in stages:
            self._stage(stage)

    def _stage(self, stage: str) -> list[int]:
        counts = self._counts[stage] = [0] * (len(self._bounds) + 1)
        self._sums[stage] = 0.0
        return counts

    def observe(self, stage: str, seconds: float) -> None:
        """One record's time in ``stage`` (negative times count as 0)."""
        seconds = max(seconds, 0.0)
        counts = self._counts.get(stage) or self._stage(stage)
        counts[bisect.bisect_left(self._bounds, seconds)] += 1  # le: upper bounds included
        self._sums[stage] += seconds

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self._name, self._documentation, labels=["stage"])
        for stage, counts in self._counts.items():
            cumulative, buckets = 0, []
            for le, count in zip(self._le, counts, strict=True):
                cumulative += count
                buckets.append((le, float(cumulative)))
            family.add_metric([stage], buckets, self._sums[stage])
        yield family
