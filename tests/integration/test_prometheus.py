"""Every dashboard query and alert rule returns data from a real Prometheus scraping the service.

A real Prometheus (Debian's ``prometheus``) runs with the repository's scrape
config and alert rules, only re-pointed at the in-process service and lag exporter
(``streamer lag``) and at 1 s intervals. Once records have flowed (predictions and
dead letters) and every series has been scraped a few times, each PromQL expression of the Grafana
dashboard and of the alert rules (without its threshold) must parse and return
at least one series: a renamed metric, a wrong label or a typo shows up as an
empty panel or a rule that can never fire, which nothing else would notice.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import socket
import textwrap
import time
import urllib.parse
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from streamer import corpus
from streamer.tools.lag import LagExporter
from tests.httpclient import request
from tests.integration.helpers import produce, running_service, service_settings, wait_for

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(600),
    pytest.mark.skipif(
        shutil.which("prometheus") is None, reason="prometheus is installed by make test"
    ),
]

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
ALERT_RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "streamer.json"

# Rules end with `<query> <op> <number>`; the query alone must return series.
THRESHOLD = re.compile(r"\s*(>|<|==)\s*[0-9.]+\s*$")
RULE_NAME = re.compile(r"^\s*-\s+(?:alert|record):\s*(\S+)\s*$")
RULE_EXPR = re.compile(r"^(\s*)expr:\s*(.*?)\s*$")
BLOCK_SCALAR = re.compile(r"^[|>][+-]?$")


# ------------------------------------------------------------ expressions


def dashboard_expressions(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, expr) for every query of every panel, rows' nested panels included."""
    found: list[tuple[str, str]] = []

    def walk(node: Any, title: str) -> None:
        if isinstance(node, dict):
            title = node.get("title", title) if "panels" in node or "targets" in node else title
            if isinstance(node.get("expr"), str):
                found.append((f"dashboard panel {title!r} query {node.get('refId')}", node["expr"]))
            for value in node.values():
                walk(value, title)
        elif isinstance(node, list):
            for value in node:
                walk(value, title)

    walk(dashboard, "")
    return found


def dashboard_target_count(dashboard: dict[str, Any]) -> int:
    """Queries counted the plain way (panels, and panels nested in rows), to cross-check."""
    panels = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return sum(1 for p in panels for t in p.get("targets", []) if t.get("expr"))


def rule_expressions(text: str) -> dict[str, str]:
    """Rule name -> expr, read from the rules file as text (PyYAML is not a dependency).

    Handles a plain one-line ``expr:`` and block scalars (``|``, ``|-``, ``>``...);
    the names are checked against what Prometheus itself loaded.
    """
    rules: dict[str, str] = {}
    lines = text.splitlines()
    name: str | None = None
    i = 0
    while i < len(lines):
        if match := RULE_NAME.match(lines[i]):
            name = match.group(1)
        elif (match := RULE_EXPR.match(lines[i])) and name is not None:
            indent, value = len(match.group(1)), match.group(2)
            if BLOCK_SCALAR.match(value):
                body = []
                while i + 1 < len(lines) and (
                    not lines[i + 1].strip()
                    or len(lines[i + 1]) - len(lines[i + 1].lstrip()) > indent
                ):
                    i += 1
                    body.append(lines[i])
                value = textwrap.dedent("\n".join(body)).strip()
            elif value[:1] in ("'", '"'):
                value = json.loads(value) if value[0] == '"' else value[1:-1].replace("''", "'")
            rules[name] = value
            name = None
        i += 1
    return rules


# ------------------------------------------------------------ prometheus


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def substitute(text: str, pattern: str, replacement: str) -> str:
    new, count = re.subn(pattern, replacement, text, flags=re.MULTILINE)
    assert count, f"{PROMETHEUS_CONFIG} no longer matches {pattern!r}; update this test"
    return new


def scrape_config(service_port: int, prometheus_port: int, lag_port: int) -> str:
    """deploy/prometheus/prometheus.yml, re-pointed at this test's service and lag exporter,
    at 1 s intervals."""
    text = PROMETHEUS_CONFIG.read_text()
    assert re.search(r"job_name:\s*streamer\s*$", text, re.MULTILINE), (
        "the alerts need job=streamer"
    )
    text = substitute(text, r"(scrape_interval|evaluation_interval):\s*\S+", r"\1: 1s")
    text = substitute(text, r"^(\s*-\s*)alerts\.yml\s*$", rf"\g<1>{ALERT_RULES}")
    text = substitute(text, r'"streamer:9108"', f'"127.0.0.1:{service_port}"')
    text = substitute(text, r'"streamer-lag:9109"', f'"127.0.0.1:{lag_port}"')
    return substitute(text, r'"localhost:9090"', f'"127.0.0.1:{prometheus_port}"')


class Prometheus:
    def __init__(self, url: str, log_path: Path) -> None:
        self.url = url
        self.log_path = log_path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    async def api(self, endpoint: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        reply = await request(f"{self.url}/api/v1/{endpoint}?{query}")
        body = await asyncio.to_thread(reply.json)  # range queries are large: off the loop
        assert body.get("status") == "success", f"{endpoint} {params}: {reply.status} {body}"
        return body["data"]

    async def query(self, expr: str) -> list[dict[str, Any]]:
        data = await self.api("query", query=expr)
        if data["resultType"] == "scalar":
            return [{"value": data["result"]}]
        return list(data["result"])

    async def scalar(self, expr: str) -> float | None:
        result = await self.query(expr)
        return float(result[0]["value"][1]) if result else None


@contextlib.asynccontextmanager
async def running_prometheus(
    service_port: int, lag_port: int, workdir: Path
) -> AsyncIterator[Prometheus]:
    """Prometheus scraping the service and the lag exporter, ready to answer; terminated and
    reaped at exit."""
    port = free_port()
    config = workdir / "prometheus.yml"
    config.write_text(scrape_config(service_port, port, lag_port))
    log_path = workdir / "prometheus.log"
    with log_path.open("wb") as log:  # the child keeps its own copy
        process = await asyncio.create_subprocess_exec(
            "prometheus",
            f"--config.file={config}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            stdout=log,
            stderr=log,
        )
    prometheus = Prometheus(f"http://127.0.0.1:{port}", log_path)
    try:

        async def ready() -> bool:
            assert process.returncode is None, f"prometheus exited:\n{prometheus.log()}"
            try:
                return (await request(f"{prometheus.url}/-/ready", timeout_s=2)).status == 200
            except OSError:
                return False

        await wait_for(ready, 60, "prometheus to be ready")
        yield prometheus
    finally:
        if process.returncode is None:
            process.terminate()
        try:
            await asyncio.wait_for(process.wait(), 30)
        except TimeoutError:
            process.kill()
            await process.wait()


@pytest.fixture
async def loaded_service(
    kafka_bootstrap: str,
    kafka_options: dict[str, str],
    unique_name: str,
    new_topics,
    samples: list[corpus.Sample],
    tmp_path: Path,
) -> AsyncIterator[Prometheus]:
    """The service, having predicted images and dead-lettered bad records, scraped by Prometheus."""
    settings = service_settings(kafka_bootstrap, unique_name)
    await new_topics("in", "out", "dlq", partitions=3)
    images = [(s.name.encode(), s.data, []) for s in samples[:36]]
    bad: list[tuple[bytes | None, bytes, list[tuple[str, bytes]]]] = [
        (b"bad-text", b"hello, I am not an image", []),
        (b"bad-empty", b"", []),
    ]
    lag_exporter = LagExporter(
        kafka_options, settings.group_id, [settings.input_topic], interval_s=1.0, port=0
    )
    async with (
        running_service(settings) as service,
        lag_exporter,
        running_prometheus(service.metrics_port or 0, lag_exporter.port, tmp_path) as prometheus,
    ):
        for job in ("streamer", "streamer-lag"):
            await wait_for(
                lambda job=job: prometheus.scalar(f'up{{job="{job}"}} == 1'),
                60,
                f"a successful scrape of {job}",
            )

        async def predicted() -> float:
            return await prometheus.scalar("sum(streamer_records_predicted_total)") or 0.0

        # Two waves, each seen by Prometheus, so that the counters rise across scrapes.
        await produce(kafka_options, settings.input_topic, images[:12] + bad[:1])
        await wait_for(lambda: _at_least(predicted(), 12), 240, "the first wave's predictions")
        await produce(kafka_options, settings.input_topic, images[12:] + bad[1:])
        await wait_for(lambda: _at_least(predicted(), len(images)), 240, "every prediction")

        async def dead_letters() -> float:
            return await prometheus.scalar("sum(streamer_records_dead_lettered_total)") or 0.0

        await wait_for(lambda: _at_least(dead_letters(), len(bad)), 120, "every dead letter")

        # Enough scrapes of every series (the newest included) for 1m rates and deriv().
        async def scraped_enough() -> bool:
            series = await prometheus.query(
                '{job=~"streamer|streamer-lag", __name__=~"streamer_.+"}[1m]'
            )
            return bool(series) and min(len(s["values"]) for s in series) >= 3

        await wait_for(scraped_enough, 60, "three scrapes of every series")
        raw = await prometheus.query("streamer_records_predicted_total[5m]")
        values = [float(v) for _, v in raw[0]["values"]]
        assert len(values) >= 2 and values[-1] > values[0], f"no rise in predictions: {values}"
        yield prometheus


async def _at_least(value: Any, threshold: float) -> bool:
    return float(await value) >= threshold


# ------------------------------------------------------------ the test


async def test_every_dashboard_query_and_alert_rule_returns_data(
    loaded_service: Prometheus,
) -> None:
    prometheus = loaded_service
    dashboard = json.loads(DASHBOARD.read_text())
    panels = dashboard_expressions(dashboard)
    rules = rule_expressions(ALERT_RULES.read_text())
    lines = ALERT_RULES.read_text().splitlines()
    rule_names = [m.group(1) for line in lines if (m := RULE_NAME.match(line))]

    # Not vacuous: every query and every rule of the files is in the list.
    assert panels and len(panels) == dashboard_target_count(dashboard)
    assert rules and sorted(rules) == sorted(rule_names), "a rule without a readable expr"
    expressions = panels + [(f"rule {name}", THRESHOLD.sub("", e)) for name, e in rules.items()]
    assert len(expressions) == len(panels) + len(rule_names)
    for name, expr in rules.items():
        assert THRESHOLD.search(expr), f"rule {name} does not end with a threshold: {expr!r}"

    # Prometheus loaded the same rules, and each has been evaluated without error.
    async def loaded_rules() -> list[dict[str, Any]] | None:
        groups = (await prometheus.api("rules"))["groups"]
        loaded = [rule for group in groups for rule in group["rules"]]
        return loaded if loaded and all(r["health"] != "unknown" for r in loaded) else None

    loaded = await wait_for(loaded_rules, 30, "every rule to be evaluated")
    assert sorted(r["name"] for r in loaded) == sorted(rule_names)
    unhealthy = {
        r["name"]: (r["health"], r.get("lastError")) for r in loaded if r["health"] != "ok"
    }
    assert not unhealthy, f"rules not healthy: {unhealthy}"

    empty, failed = [], []
    started = time.monotonic()
    for where, expr in expressions:
        try:
            result = await prometheus.query(expr)
        except AssertionError as error:
            failed.append(f"{where}: {expr}\n    {error}")
            continue
        if not result:
            empty.append(f"{where}: {expr}")
    print(f"evaluated {len(expressions)} expressions in {time.monotonic() - started:.1f} s")
    assert not failed, "expressions Prometheus rejected:\n" + "\n".join(failed)
    assert not empty, "expressions that returned no series:\n" + "\n".join(empty)
