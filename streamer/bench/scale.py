"""Multi-instance stage: 1, 2, then 3 service instances in one group drain the same backlog.

For each instance count n in ``config.scale_instances``:

1. fresh topics ``<prefix>-n<n>-in/-out/-dlq`` (``scale_partitions`` input partitions,
   replication factor min(3, brokers); the output stamped with LogAppendTime) and a
   fresh group, so every step starts from the same empty state;
2. n ``python -m streamer run`` children start with that group, each with its own
   metrics port and small settings (``instance_settings``); the stage waits until
   every one answers ``/readyz`` and the group is Stable with n members, so no
   rebalance caused by a late joiner falls inside the measurement;
3. the backlog of ``scale_records`` corpus images is written at once (the producer
   is far faster than the group) and the group's lag (end offsets minus committed
   offsets, all partitions) is polled every second until it is 0: the drain time;
4. aggregate throughput = predictions per second between the append of the
   ``head``-th and of the ``tail``-th-from-last prediction (start-up and the end,
   where instances run out of partitions at different times, are left out); each
   instance's share = its ``streamer_records_predicted_total`` over the sum, read
   from its ``/metrics`` once every prediction is on the output topic;
5. the instances stop together (SIGTERM: they drain and commit).

Next to each step sits the capacity model's prediction (``streamer.capacity``):
mu = the aggregate measured with one instance, N_eff = effective_instances(n, P),
predicted aggregate N_eff x mu, predicted drain K / (N_eff x mu) (nothing arrives
while the backlog drains). The model assumes every instance has hardware of its own;
on one machine they share its cores, and the measured aggregate stays below the
prediction once the cores are used up.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.structs import TopicPartition

from streamer import capacity
from streamer.bench.kafka_io import make_topics, preload, read_outputs, wait_for_count
from streamer.bench.service import MemorySampler, ServiceProcess, metric_value, scrape_metrics
from streamer.bench.workload import BenchConfig, free_port, service_settings
from streamer.config import Settings
from streamer.tools.admin import create_topics

log = logging.getLogger(__name__)


def instance_settings(config: BenchConfig, prefix: str, index: int) -> Settings:
    """One instance: small enough that three fit in 24 GiB with 2 cores between them."""
    return service_settings(
        config,
        prefix,
        client_id=f"{prefix}-{index}",
        metrics_port=free_port(),
        decode_workers=1,
        max_in_flight=config.scale_max_in_flight,
        max_batch_size=min(config.max_batch_size, config.scale_max_in_flight),
        inference_threads=config.scale_inference_threads,
        cpu_inference_workers=1,
        inference_standby=False,
    )


def lag_of(committed: dict[int, int], ends: dict[int, int]) -> int:
    """Records not yet committed, over all partitions (none committed: all of it)."""
    return sum(max(0, end - committed.get(p, 0)) for p, end in ends.items())


def group_state(described: list[Any], group: str) -> tuple[str, int]:
    """(state, member count) of ``group`` from ``describe_consumer_groups`` responses."""
    for response in described:
        for g in response.to_object()["groups"]:
            if g["group"] == group:
                return str(g["state"]), len(g["members"])
    return "Unknown", 0


def predicted_total(metrics_text: str, topic: str) -> float:
    """``streamer_records_predicted_total{topic=...}`` from a ``/metrics`` page."""
    return metric_value(metrics_text, "streamer_records_predicted_total", topic=topic) or 0.0


def steady_rate(append_s: list[float], head: int, tail: int) -> dict[str, float]:
    """Records per second between the ``head``-th and the ``tail``-th-from-last append."""
    times = sorted(append_s)
    if len(times) < 2:
        return {"images_per_s": 0.0, "seconds": 0.0, "counted": float(len(times))}
    head = min(head, (len(times) - 2) // 2)
    tail = min(tail, (len(times) - 2) // 2)
    last = len(times) - 1 - tail
    span = times[last] - times[head]
    return {
        "images_per_s": (last - head) / span if span > 0 else 0.0,
        "seconds": span,
        "counted": float(last - head + 1),
        "head": float(head),
        "tail": float(tail),
        "first_to_last_s": times[-1] - times[0],
    }


def model_prediction(
    mu: float, instances: int, partitions: int, backlog: int, utilisation: float = 0.7
) -> dict[str, float | None]:
    """What ``streamer.capacity`` expects of ``instances`` instances of rate ``mu``."""
    effective = capacity.effective_instances(instances, partitions)
    drain = capacity.drain_seconds(backlog, 0.0, mu, instances, partitions) if mu > 0 else None
    return {
        "mu_per_instance": mu,
        "effective_instances": effective,
        "aggregate_per_s": effective * mu,
        "drain_s": drain,  # None: no rate measured, so never
        "max_rate_at_utilisation": effective * mu * utilisation,
    }


async def replication_factor(options: dict[str, Any]) -> int:
    admin = AIOKafkaAdminClient(**options)
    await admin.start()
    try:
        return min(3, len((await admin.describe_cluster())["brokers"]))
    finally:
        await admin.close()


class GroupWatch:
    """An admin client and a consumer kept open to read a group's state and lag."""

    def __init__(self, options: dict[str, Any], group: str, topic: str, partitions: int) -> None:
        self.group = group
        self.tps = [TopicPartition(topic, p) for p in range(partitions)]
        self.admin = AIOKafkaAdminClient(**options)
        self.consumer = AIOKafkaConsumer(**options)

    async def __aenter__(self) -> GroupWatch:
        await self.admin.start()
        await self.consumer.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.consumer.stop()
        await self.admin.close()

    async def state(self) -> tuple[str, int]:
        return group_state(await self.admin.describe_consumer_groups([self.group]), self.group)

    async def lag(self) -> int:
        raw = await self.admin.list_consumer_group_offsets(self.group)
        committed = {tp.partition: meta.offset for tp, meta in raw.items() if meta.offset >= 0}
        ends = await self.consumer.end_offsets(self.tps)
        return lag_of(committed, {tp.partition: end for tp, end in ends.items()})


async def _until(what: str, condition: Any, timeout_s: float, interval_s: float = 1.0) -> float:
    """Await ``condition()`` until true; the monotonic time it became true."""
    deadline = time.monotonic() + timeout_s
    while not await condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"scale: {what} not reached after {timeout_s:.0f} s")
        await asyncio.sleep(interval_s)
    return time.monotonic()


async def run_step(
    config: BenchConfig, corpus: list[bytes], prefix: str, n: int, rf: int, results_dir: Path
) -> dict[str, Any]:
    """One instance count: start n instances, write the backlog, measure, stop."""
    options = {"bootstrap_servers": config.bootstrap_servers}
    prefix = f"{prefix}-n{n}"
    fleet = [instance_settings(config, prefix, i) for i in range(n)]
    s = fleet[0]
    partitions, records = config.scale_partitions, config.scale_records
    await create_topics(options, [s.input_topic, s.dlq_topic, s.output_topic], partitions, rf)
    await make_topics(options, [], [s.output_topic], partitions)  # LogAppendTime
    services = [ServiceProcess(x, results_dir / f"scale-n{n}-{i}.log") for i, x in enumerate(fleet)]
    samplers: list[MemorySampler] = []
    step: dict[str, Any] = {"instances": n, "partitions": partitions, "records": records}
    try:
        for service in services:
            service.start()
            samplers.append(MemorySampler(service.pid, interval_s=5.0))
            await samplers[-1].start()
        started = time.monotonic()
        step["ready_s"] = list(await asyncio.gather(*(x.wait_ready() for x in services)))
        async with GroupWatch(options, s.group_id, s.input_topic, partitions) as watch:

            async def stable() -> bool:
                for service in services:
                    service.check_alive()
                return await watch.state() == ("Stable", n)

            step["group_stable_s"] = await _until("a stable group", stable, 300.0) - started
            await preload(options, s.input_topic, corpus, records)
            written = time.monotonic()
            series: list[tuple[float, int]] = []

            async def drained() -> bool:
                for service in services:
                    service.check_alive()
                series.append((time.monotonic() - written, await watch.lag()))
                return series[-1][1] == 0

            step["lag_drain_s"] = await _until("lag 0", drained, max(600.0, records)) - written
            step["lag_series"] = series
        await wait_for_count(options, s.output_topic, records, 120.0)
        outputs = (await read_outputs(options, s.output_topic))[:records]
        # Predictions arrive in bursts of a batch: leave out a few batches at each end,
        # never more than a tenth of the backlog.
        edge = min(config.max_batch_size * n, records // 10)
        step["aggregate"] = steady_rate([o.appended_ms / 1000 for o in outputs], edge, edge)
        counts = [
            predicted_total(await asyncio.to_thread(scrape_metrics, x), x.output_topic)
            for x in fleet
        ]
        step["predicted_by_instance"] = counts
        step["share_by_instance"] = [c / max(1.0, sum(counts)) for c in counts]
        step["peak_pss_bytes_by_instance"] = [
            x.summary().get("peak_pss_bytes", 0) for x in samplers
        ]
        step["load_average_after"] = os.getloadavg()
    finally:
        for sampler in samplers:
            await sampler.stop()
        step["exit_codes"] = list(
            await asyncio.gather(*(asyncio.to_thread(x.stop) for x in services))
        )
    return step


async def run_scale(
    config: BenchConfig, corpus: list[bytes], prefix: str, results_dir: Path
) -> dict[str, Any]:
    """Every step, then the capacity model's prediction next to each measured figure."""
    rf = await replication_factor({"bootstrap_servers": config.bootstrap_servers})
    steps = []
    for n in config.scale_instances:
        log.info("bench scale instances=%d records=%d", n, config.scale_records)
        steps.append(await run_step(config, corpus, prefix, n, rf, results_dir))
    base = steps[0]["aggregate"]["images_per_s"] / capacity.effective_instances(
        steps[0]["instances"], config.scale_partitions
    )
    for step in steps:
        step["model"] = model_prediction(
            base, step["instances"], config.scale_partitions, config.scale_records
        )
        measured = step["aggregate"]["images_per_s"]
        step["measured_vs_model"] = measured / step["model"]["aggregate_per_s"] if base else None
    return {
        "bootstrap_servers": config.bootstrap_servers,
        "replication_factor": rf,
        "cores": os.cpu_count(),
        "settings_per_instance": {
            "decode_workers": 1,
            "max_in_flight": config.scale_max_in_flight,
            "inference_threads": config.scale_inference_threads,
            "inference_standby": False,
            "weights": config.weights,
        },
        "steps": steps,
    }
