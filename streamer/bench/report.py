"""Write a run's results: ``results.json``, PNG plots (Agg backend) and a markdown table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # after use(): the backend must be chosen first
from matplotlib import ticker

from streamer.bench.scale_report import scale_table

GIB = 1024**3
MIB = 1024**2


def write(results: dict[str, Any], directory: Path) -> list[Path]:
    """Every output file of a run; returns their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / "results.json", directory / "summary.md"]
    paths[0].write_text(json.dumps(results, indent=2, default=str) + "\n")
    paths[1].write_text(summary_table(results))
    if "ceiling" in results:
        paths.append(plot_throughput(results, directory / "throughput.png"))
    if results.get("latency") and any(p["latencies_s"] for p in results["latency"].values()):
        paths.append(plot_latency(results, directory / "latency_cdf.png"))
    if results.get("memory_series"):
        paths.append(plot_memory(results, directory / "memory.png"))
    return paths


def summary_table(results: dict[str, Any]) -> str:
    m = results["machine"]
    rows = [
        (
            "machine",
            f"{m['cpu_model']}, {m['cores']} cores, {m['ram_bytes'] / GIB:.1f} GiB RAM, "
            f"GPU: {m['gpu'] or 'none'}",
        ),
        (
            "precision / weights",
            f"{results['config']['precision']} / {results['config']['weights']}",
        ),
    ]
    c = results.get("ceiling")
    if c:
        rows.append(
            (
                "(a) model ceiling",
                f"{c['images_per_s']:.2f} img/s "
                f"(batch {c['best_batch_size']}, {c.get('workers', 1)} worker(s) x"
                f" {c['threads']} threads)",
            )
        )
        agreed = c.get("agreement_with_fp32")
        if agreed:
            rows.append(
                (
                    f"{agreed['precision']} against fp32 ({agreed['images']} images)",
                    f"top-1 agreement {agreed['top1_agreement'] * 100:.1f}%, largest score"
                    f" difference {agreed['max_score_difference']:.4f}",
                )
            )
    for library, check in results.get("device_check", {}).items():
        rows.append((f"device check: {library}", _device_check(check)))
    steps = results.get("device_batch")
    if steps:
        decode = ", ".join(
            f"decode ({library}) {1000 * lib['decode_s']:.1f}"
            if "decode_s" in lib
            else f"decode ({library}) failed"
            for library, lib in steps["by_library"].items()
        )
        rows.append(
            (
                f"one batch of {steps['batch']} on the device, ms per step",
                f"{decode}; resize one by one {1000 * steps['resize_each_s']:.1f}, grouped"
                f" {1000 * steps['resize_grouped_s']:.1f}; host rows"
                f" {1000 * steps['host_rows_s']:.1f}; forward {1000 * steps['forward_s']:.1f}",
            )
        )
    for library, run in results.get("engine", {}).get("by_jpeg_library", {}).items():
        rows.append(
            (
                f"(b) engine, JPEGs decoded on the device by {library}",
                f"{run['images_per_s']:.0f} img/s, mean batch {run['mean_batch_size']:.1f},"
                f" main process {run['main_cpu_ms_per_record']:.3f} ms CPU/record, inference"
                f" worker busy {_maybe(run.get('worker_busy_share'), '.0%')} of the run",
            )
        )
    in_flight = results.get("engine_in_flight")
    if in_flight:
        rows.append(
            (
                f"(b) engine ({in_flight['jpeg_library']}) by batches in flight per device",
                ", then ".join(
                    f"{run['batches_in_flight_per_device']}: {run['images_per_s']:.0f} img/s"
                    f" (worker busy {_maybe(run.get('worker_busy_share'), '.0%')})"
                    for run in in_flight["runs"]
                ),
            )
        )
    null = results.get("engine_null")
    if null:
        rows.append(
            (
                "host path without Kafka: engine, null model and decode",
                f"{null['images_per_s']:.0f} rec/s, main process"
                f" {null['main_cpu_ms_per_record']:.3f} ms CPU/record, inference worker busy"
                f" {_maybe(null.get('worker_busy_share'), '.0%')} of the run",
            )
        )
    for key, label in (
        ("engine", "(b) engine, no Kafka"),
        ("e2e", "(c) end to end, Kafka"),
        ("naive", "(d) naive baseline"),
    ):
        if key in results:
            rows.append((label, f"{results[key]['images_per_s']:.2f} img/s"))
    e2e = results.get("e2e", {})
    if "steady" in e2e:
        rows.append(
            ("(c) steady state (first 20% left out)", f"{e2e['steady']['images_per_s']:.2f} img/s")
        )
    if "from_ready_images_per_s" in e2e:
        rows.append(
            (
                f"(c) cold start: {e2e['records']:.0f} records from ready",
                f"{e2e['from_ready_images_per_s']:.2f} img/s ({e2e['from_ready_s']:.1f} s;"
                f" ready after {e2e.get('ready_s', 0):.1f} s)",
            )
        )
    host = results.get("host")
    if host:
        bare, service = host["bare"], host["service"]
        per_record = service["main_cpu_ms_per_record"]
        rows.append(
            (
                "host path: bare aiokafka loop",
                f"{bare['images_per_s']:.0f} rec/s, {bare['cpu_ms_per_record']:.3f} ms CPU/record"
                + _machine(bare),
            )
        )
        ratio = host["service_vs_bare"]
        rows.append(
            (
                "host path: service, null model and decode",
                f"{service['images_per_s']:.0f} rec/s ({_maybe(ratio, '.2f')}x bare), main"
                f" process {_maybe(per_record, '.3f')} ms CPU/record" + _machine(service),
            )
        )
        several = host.get("instances")
        if several is not None:
            per_record = ", ".join(_maybe(ms, ".3f") for ms in several["main_cpu_ms_per_record"])
            rows.append(
                (
                    f"host path: {several['instances']} services at once, null model and decode",
                    f"{several['images_per_s']:.0f} rec/s together"
                    f" ({_maybe(several['together_vs_bare'], '.2f')}x bare; counted while all"
                    f" ran, {several['overlap']:.0%} of the drains), main processes"
                    f" {per_record} ms CPU/record" + _machine(several),
                )
            )
        for name, side in (("bare loop", bare), ("service", service)):
            if "profile" in side:
                rows.append((f"host path CPU per record, {name} (py-spy)", _parts(side["profile"])))
    for fraction, phase in results.get("latency", {}).items():
        rows.append(
            (
                f"latency at {float(fraction) * 100:.0f}% of peak "
                f"({phase['achieved_per_s']:.2f} rec/s)",
                f"p50 {phase['p50_s']:.3f} s, p95 {phase['p95_s']:.3f} s, "
                f"p99 {phase['p99_s']:.3f} s (n={phase['counted']}{_busy(phase)})",
            )
        )
    target = results.get("latency_target", {})
    for fraction, phase in target.items():
        if not isinstance(phase, dict):
            continue
        rows.append(
            (
                f"latency with a {target['target_ms']:g} ms target at"
                f" {float(fraction) * 100:.0f}% of peak ({phase['achieved_per_s']:.2f} rec/s)",
                f"p50 {phase['p50_s']:.3f} s, p95 {phase['p95_s']:.3f} s, "
                f"p99 {phase['p99_s']:.3f} s (n={phase['counted']}, mean batch"
                f" {phase['mean_batch_size']:.1f}{_busy(phase)})",
            )
        )
    mem = results.get("service_memory", {})
    if mem:
        rows.append(
            (
                "service memory (peak, incl. workers)",
                f"RSS {mem['peak_rss_bytes'] / MIB:.0f} MiB, "
                f"PSS {mem['peak_pss_bytes'] / MIB:.0f} MiB",
            )
        )
        rows.append(
            (
                "shared memory",
                f"{mem['shm_reserved_bytes'] / MIB:.0f} MiB reserved, "
                f"{mem['peak_shm_allocated_bytes'] / MIB:.1f} MiB touched (peak)",
            )
        )
    soak = results.get("soak")
    if soak:
        cps = soak["checkpoints"]
        rows.append(
            (
                f"RSS soak ({soak['duration_s']:.0f} s at {soak['achieved_per_s']:.2f} rec/s)",
                ", ".join(f"{p['checkpoint_s']:g} s: {p['rss_bytes'] / MIB:.0f} MiB" for p in cps)
                + f" ({soak['rss_change'] * 100:+.1f}%)",
            )
        )
    cost = results.get("metrics_cost")
    if cost:
        rows.append(
            (
                "metrics cost",
                f"{cost['per_record_us']:.1f} us/record, scrape {cost['scrape_ms']:.2f} ms; "
                f"{cost['cpu_share_of_machine'] * 100:.3f}% of the machine at (c)",
            )
        )
    lines = ["| measure | result |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    if "scale" in results:
        lines += ["", *scale_table(results["scale"])]
    lines += ["", "| target | value | met |", "|---|---|---|"]
    for name, t in results["targets"].items():
        met = "yes" if t["met"] else "no"
        lines.append(f"| {name}: {t['target']} | {t['value']:.4g} | {met} |")
    return "\n".join(lines) + "\n"


def _device_check(check: dict[str, Any]) -> str:
    if check.get("passed"):
        return (
            f"passed: {check['images']} images x {check['rounds']} rounds, same pixels each"
            f" round, same top-5, largest mean difference"
            f" {check['max_mean_difference_levels']:.2f} levels"
        )
    return f"left out: {check.get('not_installed') or check.get('error')}"


def _maybe(value: float | None, spec: str) -> str:
    """A figure, or "n/a" where the run was too short to measure it."""
    return "n/a" if value is None else format(value, spec)


def _busy(phase: dict[str, Any]) -> str:
    """The inference workers' busy share and the machine's busy cores of a phase, as
    ``, inference busy 0.87, machine 1.9 cores busy``; what it did not measure is
    left out (older results have neither)."""
    busy, cores = phase.get("inference_busy"), phase.get("machine_busy_cores")
    return (f", inference busy {busy:.2f}" if busy is not None else "") + (
        f", machine {cores:.1f} cores busy" if cores is not None else ""
    )


def _machine(side: dict[str, Any]) -> str:
    """``, machine 0.150 ms CPU/record`` where a host-stage side measured it."""
    ms = side.get("machine_cpu_ms_per_record")
    return "" if ms is None else f", machine {ms:.3f} ms CPU/record"


def plot_throughput(results: dict[str, Any], path: Path) -> Path:
    """Throughput of every stage the run has, and the batch-time table t(b)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    e2e = results.get("e2e", {})
    candidates = {
        "(a) ceiling": results["ceiling"]["images_per_s"],
        "(b) engine": results.get("engine", {}).get("images_per_s"),
        "(c) drain": e2e.get("images_per_s"),
        "(c) steady": e2e.get("steady", {}).get("images_per_s"),
        "(c) cold start": e2e.get("from_ready_images_per_s"),
        "(d) naive": results.get("naive", {}).get("images_per_s"),
    }
    stages = {name: value for name, value in candidates.items() if value is not None}
    bars = left.bar(list(stages), list(stages.values()), color="#27a")
    left.bar_label(bars, fmt="%.1f")
    left.set_ylabel("images / s")
    left.set_title(f"Throughput by stage ({results['config']['precision']})")
    left.tick_params(axis="x", labelrotation=20)
    by_batch = results["ceiling"]["by_batch_size"]
    sizes = sorted(by_batch, key=int)
    xs = [int(s) for s in sizes]
    right.plot(xs, [by_batch[s]["images_per_s"] for s in sizes], "o-", label="images / s")
    right.set_xscale("log", base=2)
    right.set_xlabel("batch size b")
    right.set_ylabel("images / s")
    right.set_title("Batch-time table: model on ready tensors")
    seconds = right.twinx()
    seconds.plot(xs, [by_batch[s]["forward_s"] for s in sizes], "s--", color="#c54", label="t(b)")
    seconds.set_yscale("log")
    seconds.set_ylabel("t(b): seconds per forward pass", color="#c54")
    for x, s in zip(xs, sizes, strict=True):
        seconds.annotate(
            f"{by_batch[s]['forward_s']:.3f}", (x, by_batch[s]["forward_s"]), fontsize=7
        )
    return _save(fig, path)


def plot_latency(results: dict[str, Any], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4))
    target = results.get("latency_target", {})
    runs = [("", results["latency"])]
    if target:
        runs.append((f", {target['target_ms']:g} ms target", target))
    for suffix, phases in runs:
        for fraction, phase in phases.items():
            if not isinstance(phase, dict) or not phase["latencies_s"]:
                continue
            values = phase["latencies_s"]
            ys = [(i + 1) / len(values) for i in range(len(values))]
            ax.step(
                values,
                ys,
                where="post",
                label=f"{float(fraction) * 100:.0f}% of peak ({phase['achieved_per_s']:.1f}/s)"
                + suffix,
            )
    ax.set_xlabel("end-to-end latency (s): input CreateTime -> prediction appended")
    ax.set_xscale("log")  # the phases differ by orders of magnitude near saturation
    # Ticks at 1, 2 and 5 of each decade, in plain seconds (the default labels every
    # minor tick in powers of ten, and neighbouring labels overlap).
    ax.xaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}"))
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    ax.set_ylabel("fraction of records")
    ax.set_title("End-to-end latency CDF")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_memory(results: dict[str, Any], path: Path) -> Path:
    series = results["memory_series"]
    fig, ax = plt.subplots(figsize=(7, 4))
    ts = [s["t_s"] for s in series]
    ax.plot(ts, [s["rss_bytes"] / MIB for s in series], label="RSS (sum over processes)")
    ax.plot(ts, [s["pss_bytes"] / MIB for s in series], label="PSS (sum)")
    ax.plot(ts, [s["shm_allocated_bytes"] / MIB for s in series], label="/dev/shm touched")
    ax.set_xlabel("seconds since the service started")
    ax.set_ylabel("MiB")
    ax.set_title("Service memory")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _parts(profile: dict[str, Any]) -> str:
    """``Kafka client 0.041 ms, ...`` (or shares, without a CPU figure)."""
    ms = profile["ms_per_record"]
    return (
        ", ".join(
            f"{part.replace('_', ' ')} "
            + (f"{ms[part]:.3f} ms" if part in ms else f"{100 * share:.0f}%")
            for part, share in profile["share"].items()
        )
        + f" ({profile['samples']} samples)"
    )
