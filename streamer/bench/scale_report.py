"""The multi-instance stage's part of ``summary.md``: one row per instance count."""

from __future__ import annotations

import math
from typing import Any


def _seconds(value: float | None) -> str:
    return "never" if value is None or math.isinf(value) else f"{value:.1f} s"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def scale_table(scale: dict[str, Any]) -> list[str]:
    """Measured aggregate, shares and drain time next to the capacity model's prediction."""
    per = scale["settings_per_instance"]
    lines = [
        f"Multi-instance stage: one group on {scale['bootstrap_servers']} (replication factor "
        f"{scale['replication_factor']}), {scale['cores']} cores shared by every instance; per "
        f"instance decode_workers={per['decode_workers']}, max_in_flight={per['max_in_flight']}, "
        f"inference_threads={per['inference_threads']}, no standby, weights {per['weights']}. "
        "Model: mu = the one-instance aggregate, hardware of its own per instance.",
        "",
        "| instances | partitions | backlog | aggregate (steady) | model | measured / model "
        "| share by instance | lag 0 after | model drain | ready / stable group |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for step in scale["steps"]:
        shares = " / ".join(f"{x:.0%}" for x in step["share_by_instance"])
        ready = max(step["ready_s"])
        lines.append(
            f"| {step['instances']} | {step['partitions']} | {step['records']} "
            f"| {step['aggregate']['images_per_s']:.2f} img/s "
            f"| {step['model']['aggregate_per_s']:.2f} img/s "
            f"| {_ratio(step['measured_vs_model'])} | {shares} "
            f"| {_seconds(step['lag_drain_s'])} | {_seconds(step['model']['drain_s'])} "
            f"| {ready:.0f} s / {step['group_stable_s']:.0f} s |"
        )
    return lines
