"""Turns per-run JSON into the figures of the report: medians with [min, max] over repeats, MFU, ratios.

Only finite values of runs with status ``ok`` are summarised; a configuration is ``ok`` when all its runs are,
``skipped`` when all were refused at setup (with the reason), ``error`` otherwise.
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Iterable, Optional

from benchmarks.configs import Config

SUMMARISED = (
    "samples_per_s", "time_to_target_s", "train_time_to_target_s", "final_accuracy", "best_accuracy", "mfu",
    "mfu_all_cores", "staleness_mean", "staleness_max", "peak_rss_mib", "startup_s", "intra_op_threads",
    "load_before", "busy_before",
)


def summarize(values: Iterable[Any]) -> Optional[dict[str, float]]:
    """Median, min, max and count of the finite numbers in ``values``; ``None`` when there are none."""
    finite = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not finite:
        return None
    return {"median": statistics.median(finite), "min": min(finite), "max": max(finite), "n": len(finite)}


def peak_for(peaks: dict[str, Any], threads: Optional[int], world_size: int) -> Optional[float]:
    """Measured fp32 peak for ``world_size`` ranks of ``threads`` intra-op threads each (``"gpu"`` on GPU)."""
    entry = peaks.get("gpu") or (peaks.get(str(threads)) if threads is not None else None)
    return entry["best_flops"] * world_size if entry else None


def add_derived(run: dict[str, Any], calibration: dict[str, Any]) -> None:
    """MFU against the peak on the run's own thread count, and against all cores (the machine's peak)."""
    if run.get("status") != "ok":
        return
    profile = calibration["workloads"].get(run["workload"], {})
    flops = profile.get("train_flops_per_sample")
    samples_per_s = run.get("samples_per_s")
    if not flops or not samples_per_s or not math.isfinite(samples_per_s):
        return
    achieved = flops * samples_per_s
    peaks = calibration["peaks"]
    own = peak_for(peaks, run.get("intra_op_threads"), run.get("world_size", 1))
    machine = peak_for(peaks, calibration["machine"]["torch_default_num_threads"], 1)
    run["achieved_flops"] = achieved
    run["mfu"] = achieved / own if own else None
    run["mfu_all_cores"] = achieved / machine if machine else None


def _status(runs: list[dict[str, Any]]) -> tuple[str, Optional[str]]:
    if not runs:
        return "skipped", "no run"
    statuses = {r["status"] for r in runs}
    if statuses == {"ok"}:
        return "ok", None
    reason = next(r.get("reason") for r in runs if r["status"] != "ok")
    return ("skipped" if statuses == {"skipped"} else "error"), reason


def _ratio_summary(runs: list[dict[str, Any]], key: str, reference: Optional[float]) -> Optional[dict[str, float]]:
    """Each run's ``key`` divided by the reference configuration's median (median [min, max] of those ratios)."""
    if not reference:
        return None
    return summarize(r.get(key) / reference for r in runs if isinstance(r.get(key), (int, float)))


def configuration_entry(
    workload: str, config: Config, runs: list[dict[str, Any]], skipped_reason: Optional[str] = None
) -> dict[str, Any]:
    status, reason = ("skipped", skipped_reason) if skipped_reason else _status(runs)
    ok = [r for r in runs if r["status"] == "ok"]
    return {
        "workload": workload,
        "config": config.name,
        "settings": config.to_dict(),
        "status": status,
        "reason": reason,
        "runs": len(runs),
        "ok_runs": len(ok),
        "target_reached": sum(1 for r in ok if r.get("time_to_target_s") is not None),
        "metrics": {key: summarize(r.get(key) for r in ok) for key in SUMMARISED},
        "run_ids": [r["run_id"] for r in runs],
    }


def add_relative(entries: list[dict[str, Any]], runs: list[dict[str, Any]], reference: str = "plain") -> None:
    """Throughput and time to target of every row relative to the workload's plain-Lightning median."""
    for entry in entries:
        base = next((e for e in entries if e["workload"] == entry["workload"] and e["config"] == reference), None)
        mine = [r for r in runs if r["run_id"] in entry["run_ids"] and r["status"] == "ok"]
        speed = (base or {}).get("metrics", {}).get("samples_per_s") or {}
        tta = (base or {}).get("metrics", {}).get("time_to_target_s") or {}
        entry["throughput_vs_plain"] = _ratio_summary(mine, "samples_per_s", speed.get("median"))
        entry["time_to_target_vs_plain"] = _ratio_summary(mine, "time_to_target_s", tta.get("median"))


def straggler_rows(
    entries: list[dict[str, Any]], runs: list[dict[str, Any]], workload: str, configs: dict[str, Config]
) -> list[dict[str, Any]]:
    """The straggler sweep: each method at each delay, normalised to that method's own no-delay median."""
    rows = []
    sweep = [e for e in entries if e["workload"] == workload and configs[e["config"]].straggler_factor is not None
             and configs[e["config"]].devices > 1]
    for method in sorted({configs[e["config"]].method for e in sweep}):
        base = next((e for e in sweep if e["config"] == method), None)
        base_speed = ((base or {}).get("metrics", {}).get("samples_per_s") or {}).get("median")
        base_tta = ((base or {}).get("metrics", {}).get("time_to_target_s") or {}).get("median")
        for entry in sorted((e for e in sweep if configs[e["config"]].method == method),
                            key=lambda e: configs[e["config"]].straggler_factor or 0.0):
            mine = [r for r in runs if r["run_id"] in entry["run_ids"] and r["status"] == "ok"]
            rows.append({
                "workload": workload,
                "method": method,
                "config": entry["config"],
                "factor": configs[entry["config"]].straggler_factor,
                "status": entry["status"],
                "reason": entry["reason"],
                "samples_per_s": entry["metrics"]["samples_per_s"],
                "time_to_target_s": entry["metrics"]["time_to_target_s"],
                "relative_throughput": _ratio_summary(mine, "samples_per_s", base_speed),
                "relative_time_to_target": _ratio_summary(mine, "time_to_target_s", base_tta),
            })
    return rows
