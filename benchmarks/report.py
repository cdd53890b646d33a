"""The human-readable report: ``results.md`` with the command, the machine, and medians [min, max] per row."""

from __future__ import annotations

import math
from typing import Any, Optional

HOGWILD_NOTE = """\
**No Hogwild!/LPP-SGD row.** A lock-free shared-memory baseline (several workers each running forward, backward
and an unsynchronised optimizer step on one shared copy of the weights) cannot be expressed fairly here:
Lightning has no strategy for it and its loop, hooks and `self.log` are single-threaded (see
`lightning_pdasgd/DESIGN.md`), so it would need a hand-written training loop outside Lightning. Its numbers would
then measure the absence of Lightning's per-step overhead (which on the digits workloads is larger than the
model's own compute) rather than the algorithm; and with BatchNorm in the models, its workers would race on the
running statistics and on private optimizer states that no user optimizer defines. Every row here is a
`Trainer(strategy=...)` a Lightning user can choose with the same LightningModule."""

BUSY_THRESHOLD = 0.15


def _busy_warning(runs: list[dict[str, Any]]) -> str:
    """A loud note when some runs started while other processes held a noticeable share of the CPU."""
    busy = [r for r in runs if (r.get("busy_before") or 0.0) > BUSY_THRESHOLD]
    if not busy:
        return ""
    return (
        f". **{len(busy)} of {len(runs)} runs started while other processes kept more than"
        f" {BUSY_THRESHOLD:.0%} of the CPU busy: their timings measure contention as much as the strategy**"
        " (per row: the *others' CPU* column; per run: `busy_before` in `results.json`). Tiny models on several"
        " intra-op threads are the most affected; publish numbers from an otherwise idle machine."
    )

CPU_STRAGGLER_NOTE = (
    " On CPU the ranks share the machine's cores: while the slowed rank sleeps, the others get more CPU time, so"
    " a rank-1 delay can raise the others' speed; the paper's setting (one device per rank) does not have this."
)

COLUMNS_NOTE = """\
- **samples/s**: training samples per second in steady state: epochs after the first (warm-up) one, validation
  time excluded, PD-ASGD's drain before validation and at epoch end included. Multi-device rows count the
  samples of all ranks. Median [min, max] over the repeats.
- **x plain**: each run's samples/s divided by the plain-Lightning median of the same workload.
- **time to target**: wall seconds from `on_train_start` to the first validation at or above the workload's
  target accuracy (validation time included; interpreter start-up and process launch excluded), with how many
  runs reached it.
- **final acc**: validation accuracy after the last epoch.
- **MFU**: (FLOPs per sample of forward+backward, counted once with `torch.utils.flop_counter.FlopCounterMode`)
  x samples/s / fp32 matmul peak measured in this run on the run's own intra-op thread count (x ranks).
  PD-ASGD's backward threads run on top of its intra-op threads, so its MFU on the own-thread peak can exceed
  what those threads alone could do; `mfu_all_cores` in `results.json` divides by the all-cores peak instead.
- **staleness**: PD-ASGD's mean and max staleness over all parameter updates (`trainer.strategy.stats`).
- **RSS**: peak resident set size of the run's process (rank 0 for multi-device rows).
- **threads**: `torch.get_num_threads()` at the start of training (Lightning sets `cores // devices` for DDP).
- **others' CPU**: share of all cores other processes kept busy in a 0.3 s window just before the run started
  (this benchmark cannot stop other load on a shared machine; it shows it)."""


def _num(value: Optional[float], digits: int = 3) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def _spread(summary: Optional[dict[str, float]], digits: int = 3, scale: float = 1.0, unit: str = "") -> str:
    if not summary:
        return "-"
    median, low, high = (summary[k] * scale for k in ("median", "min", "max"))
    if summary.get("n", 1) == 1:
        return f"{_num(median, digits)}{unit}"
    return f"{_num(median, digits)}{unit} [{_num(low, digits)}, {_num(high, digits)}]"


def _status_cell(entry: dict[str, Any]) -> str:
    if entry["status"] == "ok":
        return "ok"
    reason = (entry.get("reason") or "").replace("\n", " ").replace("|", "/")
    return f"{entry['status']}: {reason}"


def _staleness(metrics: dict[str, Any]) -> str:
    mean, peak = metrics.get("staleness_mean"), metrics.get("staleness_max")
    if not mean:
        return "-"
    return f"{_num(mean['median'], 2)} / {_num(peak['max'] if peak else None)}"


def configuration_table(entries: list[dict[str, Any]], target: float) -> list[str]:
    lines = [
        f"| configuration | runs | samples/s | x plain | time to {target:g} acc (s) | final acc | MFU |"
        " staleness mean / max | RSS (MiB) | threads | others' CPU | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for entry in entries:
        m = entry["metrics"]
        reached = f" ({entry['target_reached']}/{entry['ok_runs']})" if entry["ok_runs"] else ""
        threads = m.get("intra_op_threads")
        lines.append(
            f"| `{entry['config']}` | {entry['runs']} | {_spread(m['samples_per_s'])} |"
            f" {_spread(entry.get('throughput_vs_plain'), 2)} | {_spread(m['time_to_target_s'])}{reached} |"
            f" {_spread(m['final_accuracy'])} | {_spread(m['mfu'], 2, 100.0, '%')} | {_staleness(m)} |"
            f" {_spread(m['peak_rss_mib'], 4)} | {_num(threads['median']) if threads else '-'} |"
            f" {_spread(m.get('busy_before'), 2, 100.0, '%')} | {_status_cell(entry)} |"
        )
    return lines


def straggler_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| method | rank-1 delay (x step time) | samples/s | relative throughput | time to target (s) |"
        " relative time to target | status |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| `{row['method']}` | {row['factor']:g} | {_spread(row['samples_per_s'])} |"
            f" {_spread(row['relative_throughput'], 2)} | {_spread(row['time_to_target_s'])} |"
            f" {_spread(row['relative_time_to_target'], 2)} | {_status_cell(row)} |"
        )
    return lines


def _machine_lines(results: dict[str, Any]) -> list[str]:
    machine = results["calibration"]["machine"]
    versions = machine["versions"]
    peaks = results["calibration"]["peaks"]
    peak_text = ", ".join(
        f"{'GPU' if key == 'gpu' else key + ' thread' + ('s' if key != '1' else '')}:"
        f" {value['best_flops'] / 1e9:,.1f} GFLOP/s" for key, value in sorted(peaks.items())
    )
    env = ", ".join(f"{k}={v}" for k, v in machine["env_threads"].items()) or "OMP_NUM_THREADS/MKL_NUM_THREADS unset"
    load = results.get("load_average")
    busy = results.get("busy_before")
    return [
        f"- CPU: {machine['cpu_model']}, {machine['cpu_count']} cores ({machine['usable_cores']} usable),"
        f" {machine['memory_gib']} GiB RAM; GPU: {', '.join(machine['gpus']) or 'none'}",
        f"- torch {versions['torch']} (`{machine['torch_build']}`), lightning {versions['lightning']},"
        f" lightning-pdasgd {versions['lightning-pdasgd']}, torchmetrics {versions['torchmetrics']},"
        f" Python {machine['python']}, {machine['platform']}",
        f"- `torch.get_num_threads()` in a fresh process: {machine['torch_default_num_threads']}; {env};"
        f" float32 matmul precision `{machine['float32_matmul_precision']}`",
        f"- fp32 matmul peak measured in this run ({int(next(iter(peaks.values()))['size'])}^2, best of"
        f" {int(next(iter(peaks.values()))['repeats'])}): {peak_text}",
        f"- 1-minute load average just before each run: {_spread(load, 3)}" if load else "",
        f"- CPU kept busy by other processes in a 0.3 s quiet window before each run:"
        f" {_spread(busy, 2, 100.0, '%')}" + _busy_warning(results["runs"]) if busy else "",
    ]


def render(results: dict[str, Any]) -> str:
    """The whole ``results.md``."""
    settings = results["settings"]
    lines = [
        f"# PD-ASGD benchmarks: suite `{results['suite']}`",
        "",
        "```bash",
        results["command"],
        "```",
        "",
        f"{results['suite_description']}. Started {results['started_at']} (UTC), took"
        f" {results['duration_s'] / 60:.1f} min for {len(results['runs'])} runs.",
        "",
        "## Machine",
        "",
        *[line for line in _machine_lines(results) if line],
        "",
        "## Protocol",
        "",
        f"- Same model, data, seed ({settings['seed']}), batch size per device and optimizer (SGD, momentum 0.9)"
        " for every configuration of a workload; accelerator"
        f" `{settings['accelerator']}`, multi-device rows on {settings['devices']} devices.",
        f"- Up to {settings['repeats']} repeats, interleaved (every configuration once, then again): each run in a"
        " fresh Python process; medians with [min, max].",
        f"- Steady state excludes the first {settings['warmup_epochs']} epoch(s) (warm-up).",
        f"- Median process start-up (interpreter + imports, excluded from every figure):"
        f" {_spread(results.get('startup_s'), 3)} s.",
        "",
    ]
    for workload in results["workloads"]:
        lines += [f"## Workload `{workload['name']}`", "", workload["description"] + ".", ""]
        if workload["status"] != "ok":
            lines += [f"Skipped: {workload['reason']}", ""]
            continue
        profile = workload["profile"]
        lines += [
            f"Batch {workload['batch_size']} per device, {workload['epochs']} epochs, validation every"
            f" {workload['val_check_interval']:g} epoch, target accuracy"
            f" {workload['target_accuracy']:g}. Forward+backward {profile['train_flops_per_sample'] / 1e6:,.2f}"
            f" MFLOP/sample; {profile['parameters']:,} parameters. Backward/forward time ratio with plain torch:"
            f" {_num(profile.get('backward_forward_ratio'))} on the default threads (forward"
            f" {_num(profile.get('forward_ms'))} ms, backward {_num(profile.get('backward_ms'))} ms per batch),"
            f" {_num(profile.get('backward_forward_ratio_1thread'))} on 1 thread (forward"
            f" {_num(profile.get('forward_ms_1thread'))} ms, backward {_num(profile.get('backward_ms_1thread'))} ms).",
            "",
            *configuration_table([e for e in results["configurations"] if e["workload"] == workload["name"]],
                                 workload["target_accuracy"]),
            "",
        ]
    if results["straggler"]:
        lines += [
            "## Straggler sweep",
            "",
            f"{settings['devices']} ranks, rank 1 slowed by `lightning_pdasgd.Straggler(rank=1, factor=f)` (it sleeps"
            " f x its own step time per step: f=1 is half speed). Each method is normalised to its own no-delay"
            " median. A synchronous method is bounded by 1/(1+f); fully independent ranks would keep"
            " (N-1+1/(1+f))/N." + (CPU_STRAGGLER_NOTE if settings["accelerator"] == "cpu" else ""),
            "",
            *straggler_table(results["straggler"]),
            "",
        ]
    lines += ["## Columns", "", COLUMNS_NOTE, "", "## Baselines not included", "", HOGWILD_NOTE, ""]
    lines += ["Plots: " + ", ".join(f"`{name}`" for name in results["plots"]), ""]
    return "\n".join(lines)
