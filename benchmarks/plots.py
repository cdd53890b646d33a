"""The PNG figures of a benchmark run: samples/s per configuration, accuracy vs wall time, straggler sweep."""

from __future__ import annotations

from pathlib import Path
from typing import Any

GROUP_COLORS = {
    "baseline": "#4c72b0", "ratio": "#dd8452", "threads": "#8172b3", "ablation": "#c44e52", "overhead": "#937860",
    "multi": "#55a868", "straggler": "#da8bc3",
}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    return plt


def _grid(plt: Any, count: int, height: float) -> tuple[Any, list[Any]]:
    figure, axes = plt.subplots(count, 1, figsize=(9, height * count), squeeze=False)
    return figure, [row[0] for row in axes]


def throughput_bars(results: dict[str, Any], path: Path) -> None:
    """Median samples/s per configuration with [min, max] whiskers; refused rows are labelled, not drawn."""
    plt = _pyplot()
    workloads = [w["name"] for w in results["workloads"] if w["status"] == "ok"] or ["(none)"]
    figure, axes = _grid(plt, len(workloads), 0.45 * max(4, max(
        (sum(1 for e in results["configurations"] if e["workload"] == w) for w in workloads), default=4)) + 1)
    for axis, workload in zip(axes, workloads):
        entries = [e for e in results["configurations"] if e["workload"] == workload]
        labels, medians, lows, highs, colors = [], [], [], [], []
        for entry in entries:
            summary = entry["metrics"].get("samples_per_s")
            labels.append(entry["config"] if entry["status"] == "ok" else f"{entry['config']} ({entry['status']})")
            median = summary["median"] if summary else 0.0
            medians.append(median)
            lows.append(median - summary["min"] if summary else 0.0)
            highs.append(summary["max"] - median if summary else 0.0)
            colors.append(GROUP_COLORS.get(entry["settings"]["group"], "#777777"))
        positions = list(range(len(entries)))
        axis.barh(positions, medians, xerr=[lows, highs], color=colors, capsize=3)
        axis.set_yticks(positions, labels, fontsize=8)
        axis.invert_yaxis()
        axis.set_xlabel("training samples/s (median, whiskers: min-max)")
        axis.set_title(f"{workload}: throughput per configuration")
        axis.grid(axis="x", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def accuracy_vs_time(results: dict[str, Any], path: Path) -> None:
    """Validation accuracy against wall time since train start, every run of every (non-straggler) row that ran."""
    plt = _pyplot()
    workloads = [w for w in results["workloads"] if w["status"] == "ok"] or [{"name": "(none)", "target_accuracy": 0}]
    figure, axes = _grid(plt, len(workloads), 4.5)
    cmap = plt.get_cmap("tab10")
    styles = ("-", "--", ":", "-.")
    for axis, workload in zip(axes, workloads):
        entries = [e for e in results["configurations"] if e["workload"] == workload["name"] and e["ok_runs"]
                   and e["settings"]["group"] != "straggler"]  # those are in straggler.png
        for index, entry in enumerate(entries):
            color, style = cmap(index % 10), styles[(index // 10) % len(styles)]
            runs = [r for r in results["runs"] if r["run_id"] in entry["run_ids"] and r["status"] == "ok"]
            for number, run in enumerate(runs):
                points = run.get("validations") or []
                axis.plot([p["wall_s"] for p in points], [p["accuracy"] for p in points], marker=".", color=color,
                          linestyle=style, alpha=0.8, linewidth=1, label=entry["config"] if number == 0 else None)
        if workload.get("target_accuracy"):
            axis.axhline(workload["target_accuracy"], color="black", linestyle="--", linewidth=0.8, label="target")
        axis.set_xlabel("wall time since train start (s)")
        axis.set_ylabel("validation accuracy")
        axis.set_title(f"{workload['name']}: accuracy vs wall time (every repeat)")
        axis.grid(alpha=0.3)
        if entries:
            axis.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def straggler_sweep(results: dict[str, Any], path: Path) -> None:
    """Throughput and time to target vs the straggler's delay, each method normalised to its no-delay median."""
    plt = _pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    rows = results["straggler"]
    devices = results["settings"]["devices"]
    factors = sorted({row["factor"] for row in rows} | {0.0})
    dense = [factors[0] + i * (factors[-1] - factors[0]) / 100 for i in range(101)] if len(factors) > 1 else factors
    left.plot(dense, [1 / (1 + f) for f in dense], "k--", linewidth=0.8, label="synchronous bound 1/(1+f)")
    left.plot(dense, [(devices - 1 + 1 / (1 + f)) / devices for f in dense], "k:", linewidth=0.8,
              label="independent ranks")
    for method in sorted({row["method"] for row in rows}):
        mine = [row for row in rows if row["method"] == method]
        for axis, key in ((left, "relative_throughput"), (right, "relative_time_to_target")):
            points = [(row["factor"], row[key]) for row in mine if row[key]]
            if not points:
                continue
            xs = [p[0] for p in points]
            medians = [p[1]["median"] for p in points]
            errors = [[m - p[1]["min"] for m, p in zip(medians, points)],
                      [p[1]["max"] - m for m, p in zip(medians, points)]]
            axis.errorbar(xs, medians, yerr=errors, marker="o", capsize=3, label=method)
        if not any(row["relative_throughput"] for row in mine):
            left.plot([], [], " ", label=f"{method}: skipped")
    left.set_xlabel("rank-1 delay (x its step time)")
    left.set_ylabel("samples/s / no-delay samples/s")
    left.set_title("throughput under a straggler")
    right.set_xlabel("rank-1 delay (x its step time)")
    right.set_ylabel("time to target / no-delay time to target")
    right.set_title("time to target accuracy under a straggler")
    for axis in (left, right):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_all(results: dict[str, Any], out_dir: Path) -> list[str]:
    """Every figure into ``out_dir``; returns the file names."""
    names = ["throughput.png", "accuracy_vs_time.png"]
    throughput_bars(results, out_dir / names[0])
    accuracy_vs_time(results, out_dir / names[1])
    if results["straggler"]:
        names.append("straggler.png")
        straggler_sweep(results, out_dir / names[2])
    return names
