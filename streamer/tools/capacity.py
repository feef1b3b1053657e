"""``streamer capacity``: instances, partitions, KEDA threshold and bytes for a given load.

The arithmetic is ``streamer.capacity``; this module reads the command line (or a
benchmark's results.json for the per-instance rate) and prints the plan as text
or JSON. Nothing here talks to Kafka. docs/SCALING.md explains every figure.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from streamer import capacity
from streamer.tools.errors import UsageError, one_line_errors


def _number(kind: Callable[[str], Any], test: Callable[[Any], bool], what: str) -> Any:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not test(value) or (isinstance(value, float) and not math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value

    return parse


positive = _number(float, lambda v: v > 0, "> 0")
non_negative = _number(float, lambda v: v >= 0, ">= 0")
positive_int = _number(int, lambda v: v >= 1, "an integer >= 1")
non_negative_int = _number(int, lambda v: v >= 0, "an integer >= 0")
fraction = _number(float, lambda v: 0 < v <= 1, "in (0, 1]")


def stage_rates(text: str) -> dict[str, float]:
    """``fetch=400,decode=150,model=28,produce=900`` -> a dict; any subset of the stages."""
    rates = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        if not sep or name not in capacity.STAGES:
            raise argparse.ArgumentTypeError(
                f"{part!r}: expected NAME=RATE with NAME one of {', '.join(capacity.STAGES)}"
            )
        rates[name] = positive(value)
    if not rates:
        raise argparse.ArgumentTypeError("no stage rates given")
    return rates


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "capacity",
        help="plan instances, partitions and the KEDA threshold (see docs/SCALING.md)",
        description="Instances, partitions, KEDA lagThreshold, backlog drain time, broker "
        "bandwidth and whether images need a claim-check, for an offered load.",
    )
    parser.add_argument("--rate", type=non_negative, required=True, help="records/s offered")
    parser.add_argument(
        "--latency-budget", type=positive, required=True, help="seconds a record may wait"
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--per-instance-rate", type=positive, metavar="MU", help="records/s one instance sustains"
    )
    source.add_argument(
        "--from-bench",
        type=Path,
        metavar="RESULTS_JSON",
        help="mu from a `streamer bench` results.json: the slowest of its stage rates",
    )
    source.add_argument(
        "--stage-rates",
        type=stage_rates,
        metavar="fetch=R,decode=R,model=R,produce=R",
        help="per-instance stage rates in records/s; mu is the slowest",
    )
    parser.add_argument("--utilisation", type=fraction, default=0.7, help="target, (0, 1]")
    parser.add_argument("--partitions", type=positive_int, help="the input topic's partitions")
    parser.add_argument("--max-instances", type=positive_int, help="autoscaler ceiling")
    parser.add_argument("--backlog", type=non_negative_int, help="records of lag to drain")
    parser.add_argument("--image-bytes", type=positive_int, default=100_000)
    parser.add_argument("--prediction-bytes", type=positive_int, default=capacity.PREDICTION_BYTES)
    parser.add_argument(
        "--max-message-bytes",
        type=positive_int,
        default=capacity.KAFKA_DEFAULT_MAX_MESSAGE_BYTES,
        help="the input topic's max.message.bytes (Kafka's default: %(default)s)",
    )
    parser.add_argument("--replication-factor", type=positive_int, default=3)
    parser.add_argument("--gpus-per-instance", type=positive_int, default=1)
    parser.add_argument("--nic-gbit-per-gpu", type=positive, default=25.0)
    parser.add_argument(
        "--nic-fraction",
        type=fraction,
        default=0.5,
        help="share of the NIC per GPU that image fetches may take before a claim-check",
    )
    parser.add_argument("--format", choices=("text", "json"), default="text")
    parser.set_defaults(func=_main)


def resolve_mu(args: argparse.Namespace) -> tuple[dict[str, float], str, float, str]:
    """(stage rates, binding stage, mu, where mu came from)."""
    if args.per_instance_rate is not None:
        return (
            {"given": args.per_instance_rate},
            "given",
            args.per_instance_rate,
            "--per-instance-rate",
        )
    if args.stage_rates is not None:
        rates = args.stage_rates
        origin = "--stage-rates"
    else:
        try:
            results = json.loads(args.from_bench.read_text())
            rates = capacity.stage_rates_from_bench(results)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise UsageError(f"{args.from_bench}: not usable benchmark results ({exc})") from exc
        origin = str(args.from_bench)
    name, mu = capacity.per_instance_rate(rates)
    return rates, name, mu, origin


def build_plan(args: argparse.Namespace) -> tuple[capacity.Plan, dict[str, Any]]:
    rates, binding, mu, origin = resolve_mu(args)
    workload = capacity.Workload(
        rate=args.rate,
        latency_budget_s=args.latency_budget,
        mu=mu,
        utilisation=args.utilisation,
        partitions=args.partitions,
        max_instances=args.max_instances,
        backlog=args.backlog,
        image_bytes=args.image_bytes,
        prediction_bytes=args.prediction_bytes,
        max_message_bytes=args.max_message_bytes,
        replication_factor=args.replication_factor,
        gpus_per_instance=args.gpus_per_instance,
        nic_gbit_per_gpu=args.nic_gbit_per_gpu,
        nic_fraction=args.nic_fraction,
    )
    return capacity.plan(workload), {"stage_rates": rates, "binding_stage": binding, "from": origin}


def as_json(plan: capacity.Plan, mu_source: dict[str, Any]) -> dict[str, Any]:
    """The plan as JSON-safe data: a drain that never ends is ``null`` plus ``never``."""
    data = asdict(plan)
    for key, flag in (("drain_s", "drain_never"), ("drain_s_at_max", "drain_at_max_never")):
        value = data[key]
        data[flag] = value is not None and math.isinf(value)
        data[key] = None if value is None or math.isinf(value) else value
    data["mu"] = mu_source
    return data


def _rate(value: float) -> str:
    return f"{value:.4g}"


def _bytes(per_s: float) -> str:
    return f"{per_s / 1e6:.2f} MB/s ({per_s * 8 / 1e9:.3f} Gbit/s)"


def _drain(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if math.isinf(seconds):
        return "never (arrivals >= capacity of the busiest instance)"
    return f"{seconds:.0f} s ({seconds / 60:.1f} min)"


def as_text(plan: capacity.Plan, mu_source: dict[str, Any]) -> str:
    w = plan.workload
    rates = ", ".join(f"{k} {_rate(v)}" for k, v in mu_source["stage_rates"].items())
    partitions = f"{w.partitions} given" if w.partitions else "not given"
    rows = [
        ("offered load (lambda)", f"{_rate(w.rate)} records/s"),
        ("per-instance rate (mu)", f"{_rate(w.mu)} records/s, slowest of: {rates}"),
        ("  from", str(mu_source["from"])),
        (
            "instances (N)",
            f"{plan.instances} = ceil({_rate(w.rate)} / ({w.utilisation:g} x {_rate(w.mu)}))",
        ),
        ("max instances (N_max)", str(plan.max_instances)),
        ("partitions (>= 2 x N_max)", f"{plan.partitions_min} ({partitions})"),
        ("busiest instance at N", f"{plan.busiest_utilisation:.0%} busy"),
        (
            "KEDA lagThreshold",
            f"{plan.lag_threshold} = floor({_rate(w.mu)} x {w.latency_budget_s:g} s): "
            "the lag one instance clears within the budget",
        ),
    ]
    if w.backlog is not None:
        rows.append((f"drain {w.backlog} records at N", _drain(plan.drain_s)))
        rows.append((f"drain {w.backlog} records at N_max", _drain(plan.drain_s_at_max)))
    b = plan.bandwidth
    rows += [
        ("broker bytes in (clients)", _bytes(b["in_bytes_per_s"])),
        ("broker bytes out (clients)", _bytes(b["out_bytes_per_s"])),
        (f"replication (factor {w.replication_factor})", _bytes(b["replication_bytes_per_s"])),
    ]
    cc = plan.claim_check
    verdict = "required" if cc.required else "recommended" if cc.recommended else "not needed"
    rows.append(("claim-check", verdict + (": " + "; ".join(cc.reasons) if cc.reasons else "")))
    rows.append(
        (
            "  image fetch per GPU at mu",
            f"{_bytes(cc.fetch_bytes_per_s_per_gpu)} of a "
            f"{_bytes(cc.nic_budget_bytes_per_s_per_gpu)} budget",
        )
    )
    width = max(len(k) for k, _ in rows)
    lines = [f"{k.ljust(width)}  {v}" for k, v in rows]
    lines += [f"warning: {text}" for text in plan.warnings]
    return "\n".join(lines) + "\n"


@one_line_errors("capacity")
def _main(args: argparse.Namespace) -> int:
    plan, mu_source = build_plan(args)
    if args.format == "json":
        sys.stdout.write(json.dumps(as_json(plan, mu_source), indent=2) + "\n")
    else:
        sys.stdout.write(as_text(plan, mu_source))
    return 0


if __name__ == "__main__":  # until `capacity` is among the tools in streamer/cli.py
    _top = argparse.ArgumentParser(prog="streamer")
    _commands = _top.add_subparsers(dest="command", required=True)
    add_parser(_commands)
    _args = _top.parse_args(["capacity", *sys.argv[1:]])
    raise SystemExit(_args.func(_args))
