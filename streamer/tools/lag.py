"""``streamer lag``: the consumer group's lag from the brokers, once or as a Prometheus exporter.

The service's own lag series exist only while an instance owns the partition;
this tool asks the brokers (``streamer.kafka.lag``), so the lag stays visible
when every instance is down, restarting or stuck in a rebalance.

``--once`` prints one read as a table (or JSON lines) and exits. Without it the
tool reads every ``--interval-s`` and serves ``/metrics``, ``/healthz`` and
``/readyz`` (503 until a read succeeded, and after a failed one):

- ``streamer_group_lag_records{group,topic,partition}``: records still to read;
- ``streamer_group_committed_offset{group,topic,partition}``: only where committed;
- ``streamer_group_lag_up{group}``: 1 when the last read worked and found every topic;
- ``streamer_group_lag_reads_total{group,result}``: reads, ``ok`` or ``error``;
- ``streamer_group_lag_last_read_timestamp_seconds{group}``: when the last good read ended.

After a failed read the lag series keep the values of the last good one (a
graph keeps its line); ``streamer_group_lag_up`` says they are stale.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any, Literal, TextIO

from aiokafka.errors import KafkaError
from prometheus_client import CollectorRegistry, Counter, Gauge

from streamer import logs
from streamer.http import MetricsServer
from streamer.kafka.lag import GroupLag, LagReader
from streamer.tools.common import add_connection_flags, client_options, connected, tool_settings
from streamer.tools.errors import TopicMissing, UsageError, one_line_errors

log = logging.getLogger(__name__)

DEFAULT_PORT = 9109  # the service's is 9108
READ_TIMEOUT_S = 30.0
COLUMNS = ("GROUP", "TOPIC", "PARTITION", "COMMITTED", "END", "LAG")


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "lag",
        help="consumer-group lag from the brokers: print it, or export it to Prometheus",
        description="Read the group's committed offsets and the topic's end offsets from the"
        " brokers. No instance of the service needs to run.",
    )
    add_connection_flags(parser)
    parser.add_argument("--group", default=None, help="default: the configured group id")
    parser.add_argument(
        "--topic",
        action="append",
        default=None,
        help="topic to report; repeat for several (default: the configured input topic)",
    )
    parser.add_argument("--once", action="store_true", help="print one read and exit")
    parser.add_argument("--format", choices=("table", "json"), default="table", help="with --once")
    parser.add_argument(
        "--interval-s", type=float, default=15.0, help="seconds between reads (exporter)"
    )
    parser.add_argument(
        "--metrics-host", default="127.0.0.1", help="address of /metrics (exporter)"
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=DEFAULT_PORT,
        help=f"port of /metrics (exporter; default {DEFAULT_PORT}, 0 picks a free one)",
    )
    parser.set_defaults(func=_main)


# ------------------------------------------------------------ the table


def print_lag(lag: GroupLag, fmt: Literal["table", "json"], out: TextIO) -> None:
    """One row (or JSON object) per partition; the table ends with a total per topic."""
    if fmt == "json":
        for p in lag.partitions:
            fields = {"group": lag.group, "topic": p.topic, "partition": p.partition}
            fields |= {"committed": p.committed, "start": p.start, "end": p.end, "lag": p.lag}
            print(json.dumps(fields), file=out)
        return
    rows = [COLUMNS]
    for p in lag.partitions:
        committed = "-" if p.committed is None else str(p.committed)
        rows.append((lag.group, p.topic, str(p.partition), committed, str(p.end), str(p.lag)))
    for topic in dict.fromkeys(p.topic for p in lag.partitions):
        rows.append((lag.group, topic, "total", "", "", str(lag.total(topic))))
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    for row in rows:
        print(
            "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip(), file=out
        )


# ------------------------------------------------------------ the exporter


class LagMetrics:
    """The exporter's series, in their own registry (see the module docstring)."""

    def __init__(self, group: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.group = group
        r = self.registry
        labels = ["group", "topic", "partition"]
        self.lag = Gauge(
            "streamer_group_lag_records",
            "End offset minus the group's committed offset, from the brokers.",
            labels,
            registry=r,
        )
        self.committed = Gauge(
            "streamer_group_committed_offset",
            "The group's committed offset, from the brokers (absent: nothing committed).",
            labels,
            registry=r,
        )
        self.up = Gauge(
            "streamer_group_lag_up",
            "1 when the last read of offsets worked and found every topic.",
            ["group"],
            registry=r,
        )
        self.reads = Counter(
            "streamer_group_lag_reads_total",
            "Reads of offsets, by result.",
            ["group", "result"],
            registry=r,
        )
        self.last_read = Gauge(
            "streamer_group_lag_last_read_timestamp_seconds",
            "Unix time at which the last good read ended.",
            ["group"],
            registry=r,
        )
        for result in ("ok", "error"):
            self.reads.labels(group, result)
        self.up.labels(group).set(0)
        self._partitions: set[tuple[str, str]] = set()

    def update(self, lag: GroupLag) -> None:
        seen = set()
        for p in lag.partitions:
            key = (p.topic, str(p.partition))
            seen.add(key)
            self.lag.labels(self.group, *key).set(p.lag)
            if p.committed is None:
                with contextlib.suppress(KeyError):
                    self.committed.remove(self.group, *key)
            else:
                self.committed.labels(self.group, *key).set(p.committed)
        for key in self._partitions - seen:  # a deleted topic: its series go too
            for gauge in (self.lag, self.committed):
                with contextlib.suppress(KeyError):
                    gauge.remove(self.group, *key)
        self._partitions = seen
        self.up.labels(self.group).set(0 if lag.missing_topics else 1)
        self.reads.labels(self.group, "ok").inc()
        self.last_read.labels(self.group).set(time.time())

    def failed(self) -> None:
        self.up.labels(self.group).set(0)
        self.reads.labels(self.group, "error").inc()


class LagExporter:
    """Reads the lag every ``interval_s`` and serves it on ``/metrics``."""

    def __init__(
        self,
        options: dict[str, Any],
        group: str,
        topics: Sequence[str],
        *,
        auto_offset_reset: Literal["earliest", "latest"] = "earliest",
        interval_s: float = 15.0,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
    ) -> None:
        self.metrics = LagMetrics(group)
        self._reader = LagReader(options, group, topics, auto_offset_reset)
        self._interval_s = interval_s
        self._server = MetricsServer(host, port, self.metrics.registry, self.not_ready_reason)
        self._problem: str | None = "no read yet"
        self._task: asyncio.Task[None] | None = None
        self.reads = 0  # attempts so far, good or not

    @property
    def port(self) -> int:
        return self._server.port

    def not_ready_reason(self) -> str | None:
        return self._problem

    async def start(self) -> None:
        await self._server.start()
        self._task = asyncio.create_task(self._loop(), name="lag-reads")

    async def stop(self) -> None:
        """Stop reading, close the clients and the server; safe to call twice."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._reader.stop()
        await self._server.stop()

    async def __aenter__(self) -> LagExporter:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def read_once(self) -> None:
        """One read; its outcome goes to the metrics and /readyz, never up the stack."""
        try:
            lag = await asyncio.wait_for(self._reader.read(), READ_TIMEOUT_S)
        except (KafkaError, OSError, TimeoutError) as exc:
            self._problem = f"reading offsets failed: {exc!r}"
            self.metrics.failed()
            log.warning("lag read failed group=%s error=%r", self._reader.group, exc)
        else:
            self.metrics.update(lag)
            self._problem = f"topics missing: {lag.missing_topics}" if lag.missing_topics else None
            if lag.missing_topics:
                log.warning("topics missing group=%s topics=%s", lag.group, lag.missing_topics)
        finally:
            self.reads += 1

    async def _loop(self) -> None:
        while True:
            started = time.monotonic()
            await self.read_once()
            await asyncio.sleep(max(0.0, self._interval_s - (time.monotonic() - started)))


# ------------------------------------------------------------ entry point


async def _print_once(args: argparse.Namespace, group: str, topics: list[str]) -> None:
    options = client_options(args)
    reset = tool_settings(args).auto_offset_reset
    reader = LagReader(options, group, topics, reset)
    async with connected(reader, options["bootstrap_servers"]):
        lag = await asyncio.wait_for(reader.read(), READ_TIMEOUT_S)
    if lag.missing_topics:
        raise TopicMissing(lag.missing_topics[0])
    print_lag(lag, args.format, sys.stdout)


async def _export(args: argparse.Namespace, group: str, topics: list[str]) -> None:
    settings = tool_settings(args)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    exporter = LagExporter(
        client_options(args),
        group,
        topics,
        auto_offset_reset=settings.auto_offset_reset,
        interval_s=args.interval_s,
        host=args.metrics_host,
        port=args.metrics_port,
    )
    async with exporter:
        log.info("exporting lag group=%s topics=%s port=%d", group, topics, exporter.port)
        await stop.wait()


@one_line_errors("lag")
def _main(args: argparse.Namespace) -> int:
    settings = tool_settings(args)
    group = args.group or settings.group_id
    topics = args.topic or [settings.input_topic]
    if args.once:
        asyncio.run(_print_once(args, group, topics))
        return 0
    if args.interval_s <= 0:
        raise UsageError("--interval-s must be positive")
    logs.configure(settings.log_level, settings.log_format)
    asyncio.run(_export(args, group, topics))
    return 0
