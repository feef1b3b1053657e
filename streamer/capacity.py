"""Capacity model: how many instances, partitions and bytes a given load needs.

Pure functions, no I/O; ``streamer capacity`` (``streamer.tools.capacity``) prints
their result and the multi-instance benchmark (``streamer.bench.scale``) sets its
prediction next to what it measures. Symbols (docs/SCALING.md has the reasoning):

- lambda: offered load, records per second, all partitions together.
- mu: what one instance sustains, records per second = the slowest of its stages
  (fetch, decode, model, produce; or a rate measured through all of them at once).
- u: target utilisation of an instance, 0 < u <= 1 (headroom for bursts and rebalances).
- N = ceil(lambda / (u mu)): instances for the load.
- P >= 2 N_max partitions: every instance gets at least two partitions at the largest
  scale, and a rebalance moves a fraction of an instance's load, never all of it.
- With P partitions of equal load over N instances the busiest instance reads
  ceil(P / N) of them, i.e. the share s = ceil(P / N) / P of lambda (and of a backlog).
- KEDA lagThreshold = floor(mu B): the lag one instance clears within the latency
  budget B; KEDA asks for ceil(total lag / lagThreshold) replicas.
- Backlog L drains in L s / (mu - lambda s) seconds (= L / (N mu - lambda) when the
  partitions divide evenly); never when mu <= lambda s.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# Kafka's default message.max.bytes (1 MiB plus the record batch overhead).
KAFKA_DEFAULT_MAX_MESSAGE_BYTES = 1_048_588
# Key and headers of an input record (content-type, ce_id, traceparent) and the batch
# framing, rounded up; a dead letter carries the image plus a few more headers.
RECORD_OVERHEAD_BYTES = 1024
# A top-5 prediction: its JSON (about 700 bytes, see tests/unit/test_capacity.py)
# plus the CloudEvents headers, rounded up.
PREDICTION_BYTES = 1536
STAGES = ("fetch", "decode", "model", "produce")
MIN_PARTITIONS_PER_INSTANCE = 2
HIGH_UTILISATION = 0.85


def per_instance_rate(stage_rates: Mapping[str, float]) -> tuple[str, float]:
    """(name, rate) of the slowest stage: an instance is as fast as its slowest stage."""
    if not stage_rates:
        raise ValueError("no stage rates given")
    for name, rate in stage_rates.items():
        if not rate > 0 or math.isinf(rate):
            raise ValueError(f"stage rate {name}={rate} must be a positive number")
    name = min(stage_rates, key=lambda k: stage_rates[k])
    return name, stage_rates[name]


def stage_rates_from_bench(results: Mapping[str, Any]) -> dict[str, float]:
    """Per-instance stage rates from a ``streamer bench`` results.json.

    - model: the ceiling (forward passes on ready tensors, best batch size);
    - decode: decode workers x 1000 / mean decode ms (from the engine stage);
    - engine: decode and model together on the same cores, no Kafka;
    - end_to_end: fetch, decode, model and produce together (stage (c)).
    Fetch and produce are not measured alone; end_to_end includes them.
    """
    rates: dict[str, float] = {}
    if "ceiling" in results:
        rates["model"] = float(results["ceiling"]["images_per_s"])
    engine = results.get("engine")
    if engine:
        rates["engine"] = float(engine["images_per_s"])
        if engine.get("mean_decode_ms") and engine.get("decode_workers"):
            rates["decode"] = engine["decode_workers"] * 1000.0 / engine["mean_decode_ms"]
    if "e2e" in results:
        rates["end_to_end"] = float(results["e2e"]["images_per_s"])
    if not rates:
        raise ValueError("no ceiling, engine or e2e figures in the benchmark results")
    return rates


def check_utilisation(utilisation: float) -> None:
    if not 0 < utilisation <= 1:
        raise ValueError(f"utilisation must be in (0, 1], got {utilisation}")


def instances_needed(rate: float, mu: float, utilisation: float) -> int:
    """N = ceil(lambda / (u mu)), at least 1."""
    check_utilisation(utilisation)
    if rate < 0 or mu <= 0:
        raise ValueError("rate must be >= 0 and mu > 0")
    # The tolerance keeps float noise (14 / (0.7 x 20) = 1.0000000000000002) from adding one.
    return max(1, math.ceil(rate / (utilisation * mu) - 1e-9))


def partitions_needed(max_instances: int) -> int:
    return MIN_PARTITIONS_PER_INSTANCE * max_instances


def busiest_share(instances: int, partitions: int | None) -> float:
    """Share of the load (and of a backlog) on the busiest instance.

    Partitions are assumed to carry equal load; instances beyond ``partitions`` idle.
    Without a partition count, the load is assumed to split evenly.
    """
    if instances < 1:
        raise ValueError("instances must be >= 1")
    if partitions is None:
        return 1.0 / instances
    if partitions < 1:
        raise ValueError("partitions must be >= 1")
    return math.ceil(partitions / min(instances, partitions)) / partitions


def effective_instances(instances: int, partitions: int | None) -> float:
    """How many instances' worth of capacity N instances give: 1 / busiest share."""
    return 1.0 / busiest_share(instances, partitions)


def lag_threshold(mu: float, latency_budget_s: float) -> int:
    """KEDA lagThreshold: the lag one instance clears within the budget (at least 1)."""
    if latency_budget_s <= 0:
        raise ValueError("latency budget must be > 0")
    return max(1, math.floor(mu * latency_budget_s + 1e-9))


def drain_seconds(
    backlog: int, rate: float, mu: float, instances: int, partitions: int | None = None
) -> float:
    """Seconds until a backlog of ``backlog`` records is gone while ``rate`` keeps arriving.

    ``math.inf`` when the busiest instance receives at least what it can process.
    """
    if backlog < 0:
        raise ValueError("backlog must be >= 0")
    if backlog == 0:
        return 0.0
    share = busiest_share(instances, partitions)
    spare = mu - rate * share
    if spare <= 0:
        return math.inf
    return backlog * share / spare


def broker_bytes(
    rate: float, image_bytes: int, prediction_bytes: int, replication_factor: int
) -> dict[str, float]:
    """Bytes per second at the brokers, the whole cluster, at ``rate`` records per second.

    In: producers write images, the service writes predictions. Out: the group reads
    the images, one downstream consumer reads the predictions. Replication: each
    byte in is copied to ``replication_factor - 1`` followers.
    """
    images = rate * (image_bytes + RECORD_OVERHEAD_BYTES)
    predictions = rate * prediction_bytes
    return {
        "in_bytes_per_s": images + predictions,
        "out_bytes_per_s": images + predictions,
        "replication_bytes_per_s": (images + predictions) * (replication_factor - 1),
    }


@dataclass(frozen=True)
class ClaimCheck:
    """Whether images should travel by reference (object store key) instead of in Kafka."""

    required: bool  # the record does not fit the topic
    recommended: bool  # it fits, but one GPU's share of fetches would take too much NIC
    reasons: tuple[str, ...]
    fetch_bytes_per_s_per_gpu: float
    nic_budget_bytes_per_s_per_gpu: float


def claim_check(
    image_bytes: int,
    max_message_bytes: int,
    mu: float,
    gpus_per_instance: int,
    nic_gbit_per_gpu: float,
    nic_fraction: float,
) -> ClaimCheck:
    """The rule: required when image + record overhead > the topic's max.message.bytes;
    recommended when one instance at full speed (mu, e.g. draining a backlog) fetches
    more image bytes per GPU than ``nic_fraction`` of the NIC bandwidth per GPU."""
    per_gpu = mu * (image_bytes + RECORD_OVERHEAD_BYTES) / gpus_per_instance
    budget = nic_fraction * nic_gbit_per_gpu * 1e9 / 8
    reasons = []
    required = image_bytes + RECORD_OVERHEAD_BYTES > max_message_bytes
    if required:
        reasons.append(
            f"an image record ({image_bytes + RECORD_OVERHEAD_BYTES} bytes with headers) is "
            f"larger than max.message.bytes ({max_message_bytes})"
        )
    recommended = per_gpu > budget
    if recommended:
        reasons.append(
            f"fetching images at mu takes {per_gpu * 8 / 1e9:.2f} Gbit/s per GPU, more than "
            f"{nic_fraction:.0%} of {nic_gbit_per_gpu:g} Gbit/s"
        )
    return ClaimCheck(required, recommended or required, tuple(reasons), per_gpu, budget)


@dataclass(frozen=True)
class Workload:
    """What the plan is asked for; defaults are the command's defaults."""

    rate: float
    latency_budget_s: float
    mu: float
    utilisation: float = 0.7
    partitions: int | None = None  # the topic's current count, to check
    max_instances: int | None = None  # the autoscaler's ceiling (default: N)
    backlog: int | None = None
    image_bytes: int = 100_000
    prediction_bytes: int = PREDICTION_BYTES
    max_message_bytes: int = KAFKA_DEFAULT_MAX_MESSAGE_BYTES
    replication_factor: int = 3
    gpus_per_instance: int = 1
    nic_gbit_per_gpu: float = 25.0
    nic_fraction: float = 0.5


@dataclass(frozen=True)
class Plan:
    workload: Workload
    instances: int
    max_instances: int
    partitions_min: int
    busiest_utilisation: float  # at N instances, with the given partitions if any
    lag_threshold: int
    drain_s: float | None  # the backlog, at N instances
    drain_s_at_max: float | None  # the backlog, at max_instances
    bandwidth: dict[str, float]
    claim_check: ClaimCheck
    warnings: tuple[str, ...] = field(default=())


def plan(w: Workload) -> Plan:
    """Everything ``streamer capacity`` prints, from one workload."""
    if w.rate < 0:
        raise ValueError("rate must be >= 0")
    check_utilisation(w.utilisation)
    n = instances_needed(w.rate, w.mu, w.utilisation)
    n_max = max(n, w.max_instances or n)
    warnings = []
    if w.utilisation > HIGH_UTILISATION:
        warnings.append(
            f"utilisation {w.utilisation:g} leaves little headroom: a rebalance or a burst "
            "builds lag that drains slowly"
        )
    if w.max_instances is not None and w.max_instances < n:
        warnings.append(f"max instances {w.max_instances} is below the {n} the load needs")
    p_min = partitions_needed(n_max)
    if w.partitions is not None and w.partitions < p_min:
        idle = f"instances beyond {w.partitions} idle; " if n_max > w.partitions else ""
        warnings.append(
            f"the topic has {w.partitions} partitions, fewer than 2 x {n_max} = {p_min}; "
            f"{idle}add partitions before scaling out (it changes the key -> partition mapping)"
        )
    busiest = w.rate * busiest_share(n, w.partitions) / w.mu
    if w.partitions is not None and busiest > w.utilisation + 1e-9:
        warnings.append(
            f"{w.partitions} partitions do not split evenly over {n} instances: the busiest "
            f"runs at {busiest:.0%}; pick a partition count that {n} divides"
        )
    if w.mu * w.latency_budget_s < 1:
        warnings.append("the latency budget is shorter than one record's time at mu")
    drain = drain_at_max = None
    if w.backlog is not None:
        drain = drain_seconds(w.backlog, w.rate, w.mu, n, w.partitions)
        drain_at_max = drain_seconds(w.backlog, w.rate, w.mu, n_max, w.partitions)
        if math.isinf(drain_at_max):
            warnings.append("the backlog never drains: arrivals match or exceed capacity")
    return Plan(
        workload=w,
        instances=n,
        max_instances=n_max,
        partitions_min=p_min,
        busiest_utilisation=busiest,
        lag_threshold=lag_threshold(w.mu, w.latency_budget_s),
        drain_s=drain,
        drain_s_at_max=drain_at_max,
        bandwidth=broker_bytes(w.rate, w.image_bytes, w.prediction_bytes, w.replication_factor),
        claim_check=claim_check(
            w.image_bytes,
            w.max_message_bytes,
            w.mu,
            w.gpus_per_instance,
            w.nic_gbit_per_gpu,
            w.nic_fraction,
        ),
        warnings=tuple(warnings),
    )
