"""The issue's targets, judged from one run's results (benchmark figures, not tests)."""

from __future__ import annotations

from typing import Any

from streamer.bench.ceiling import swept_rows


def full_batch_forward_s(results: dict[str, Any]) -> float:
    """Seconds of one forward pass at the service's max batch size (from the ceiling sweep).

    Where the ceiling swept several layouts (``bench.ceiling.best_of``), the shortest
    mean pass of any row: the row with the most images/s may be several one-thread
    workers, each slower per pass, and a slower pass would make the latency limit easier.
    """
    ceiling = results["ceiling"]
    by_batch = ceiling["by_batch_size"]
    size = results["config"]["max_batch_size"]
    key = str(size) if str(size) in by_batch else max(by_batch, key=int)
    return min(float(row["forward_s"]) for row in swept_rows(ceiling, key))


def verdicts(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each target the run has the figures for (a partial run judges fewer)."""
    out: dict[str, dict[str, Any]] = {}
    engine = results.get("engine", {}).get("images_per_s")
    if engine is not None and results.get("ceiling", {}).get("device", "cpu") != "cpu":
        ratio = engine / results["ceiling"]["images_per_s"]
        out["gpu_engine_vs_ceiling"] = {"target": ">= 0.70", "value": ratio, "met": ratio >= 0.70}
        out["gpu_engine_images_per_s"] = {
            "target": ">= 8000 (one H100/H200, 500x375 JPEGs)",
            "value": engine,
            "met": engine >= 8000,
        }
    e2e = results.get("e2e", {}).get("images_per_s")
    if e2e is not None and "ceiling" in results:
        ratio = e2e / results["ceiling"]["images_per_s"]
        out["e2e_vs_ceiling"] = {"target": ">= 0.90", "value": ratio, "met": ratio >= 0.90}
    if e2e is not None and "ceiling" in results:
        ceiling = results["ceiling"]["images_per_s"]
        steady = results["e2e"]["steady"]["images_per_s"] / ceiling
        out["e2e_steady_vs_ceiling"] = {"target": ">= 0.85", "value": steady, "met": steady >= 0.85}
        cold = results["e2e"].get("from_ready_images_per_s")
        if cold is not None:
            ratio = cold / ceiling
            out["e2e_cold_start_vs_ceiling"] = {
                "target": ">= 0.75 (every record, from ready)",
                "value": ratio,
                "met": ratio >= 0.75,
            }
    if e2e is not None and "naive" in results:
        ratio = e2e / results["naive"]["images_per_s"]
        out["e2e_vs_naive"] = {"target": ">= 3.0", "value": ratio, "met": ratio >= 3.0}
    half = results.get("latency", {}).get("0.5")
    if half is not None and "ceiling" in results:
        limit = 3 * full_batch_forward_s(results)
        out["p99_at_half_peak"] = {
            "target": f"<= {limit:.3f} s (3 x one batch-{results['config']['max_batch_size']} "
            "forward pass)",
            "value": half["p99_s"],
            "met": half["p99_s"] <= limit,
        }
    target = results.get("latency_target")
    if target is not None:
        limit_s = target["target_ms"] / 1000
        for fraction in ("0.9", "0.5"):
            phase = target.get(fraction)
            if phase is not None:
                out[f"p99_with_target_at_{fraction}"] = {
                    "target": f"<= {limit_s:g} s (--latency-target-ms {target['target_ms']:g})",
                    "value": phase["p99_s"],
                    "met": phase["p99_s"] <= limit_s,
                }
    soak = results.get("soak")
    if soak is not None:
        marks = [p["checkpoint_s"] for p in soak["checkpoints"]]
        out["rss_flat"] = {
            "target": f"abs(RSS change) <= 5% between {marks[0]:g} s and {marks[-1]:g} s",
            "value": soak["rss_change"],
            "met": soak["flat"],
        }
    host = results.get("host")
    if host is not None and host["service_vs_bare"] is not None:
        ratio = host["service_vs_bare"]
        out["host_vs_bare"] = {"target": ">= 0.80", "value": ratio, "met": ratio >= 0.80}
        per_record = host["service"]["main_cpu_ms_per_record"]
        if per_record is not None:
            out["host_main_cpu_ms_per_record"] = {
                "target": "<= 0.20",
                "value": per_record,
                "met": per_record <= 0.20,
            }
    if "metrics_cost" in results:
        cost = results["metrics_cost"]["cpu_share_of_machine"]
        out["metrics_cost"] = {"target": "< 0.02", "value": cost, "met": cost < 0.02}
    return out
