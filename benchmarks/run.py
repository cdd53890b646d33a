"""The benchmark CLI: ``python -m benchmarks.run --suite smoke|quick|full --out DIR``.

Calibrates (machine, peaks, workload profiles), runs every configuration of the suite interleaved and repeated,
each in a fresh subprocess, then writes ``DIR/results.json``, ``DIR/results.md``, PNG plots and ``DIR/runs/``
(one JSON, spec and log per run). Published results go to ``--out benchmarks/results``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shlex
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

from benchmarks import aggregate, plots, report, workloads
from benchmarks.configs import SUITES, Config, Suite, WorkloadPlan, build_configs, build_suite
from benchmarks.runner import Runner, RunRequest, run_module

WARMUP_EPOCHS = 1


def target_of(plan: WorkloadPlan) -> float:
    """The plan's accuracy target, else the workload's."""
    return plan.target_accuracy if plan.target_accuracy is not None else workloads.get(plan.workload).target_accuracy


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=SUITES, default="quick",
                        help="smoke: every code path once (~1-2 min, the test suite's check); quick: < 3 min on 2"
                             " CPU cores; full: < 30 min on 2 CPU cores")
    parser.add_argument("--out", required=True, help="output folder (published results: benchmarks/results)")
    parser.add_argument("--accelerator", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--devices", type=int, default=2, help="devices (ranks) of the multi-device rows")
    parser.add_argument("--repeats", type=int, default=None, help="override the suite's repeats for every row")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cifar10-dir", default=None,
                        help="extracted CIFAR-10 python version (else $CIFAR10_DIR); never downloaded")
    parser.add_argument("--workloads", default=None, help="only these workloads of the suite (comma-separated)")
    parser.add_argument("--configs", default=None, help="only these configurations of the suite (comma-separated)")
    parser.add_argument("--dry-run", action="store_true", help="print the planned runs and exit")
    parser.add_argument("--rerender", action="store_true",
                        help="only rewrite results.md and the plots from an existing OUT/results.json")
    args = parser.parse_args(argv)
    if args.devices < 2:
        parser.error("--devices must be >= 2 (the multi-device and straggler rows need two ranks)")
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be >= 1")
    return args


def plan_runs(
    suite: Suite, configs: dict[str, Config], available: set[str], repeats: Optional[int]
) -> list[RunRequest]:
    """Every run, interleaved: repeat 0 of every configuration, then repeat 1, ... (A B C A B C ...)."""
    def count(plan: WorkloadPlan, name: str) -> int:
        return repeats if repeats is not None else plan.repeats_of(name, suite.repeats)

    most = max((count(p, c) for p in suite.plans for c in p.configs), default=0)
    return [
        RunRequest(plan.workload, configs[name], repeat, plan.epochs, plan.train_limit, plan.val_limit,
                   plan.val_check_interval, target_of(plan))
        for repeat in range(most)
        for plan in suite.plans if plan.workload in available
        for name in plan.configs if repeat < count(plan, name)
    ]


def _calibrate(args: argparse.Namespace, out: Path, suite: Suite, configs: dict[str, Config],
               names: list[str]) -> dict[str, Any]:
    """Machine description, workload profiles and matmul peaks, from one fresh subprocess."""
    runs_dir = out / "runs"
    path = runs_dir / "calibration.json"
    explicit = sorted({c.intra_op_threads for p in suite.plans for name in p.configs
                       if (c := configs[name]).intra_op_threads is not None})
    command = ["benchmarks.calibrate", "--out", str(path), "--accelerator", args.accelerator,
               "--workloads", ",".join(names), "--devices", str(args.devices), "--seed", str(args.seed),
               "--threads", ",".join(map(str, explicit)), "--repeats", str(suite.peak_repeats),
               "--size", "4096" if args.accelerator == "gpu" else "2048"]
    if args.cifar10_dir:
        command += ["--cifar10-dir", args.cifar10_dir]
    code, seconds = run_module(command, runs_dir / "calibration.log", 900)
    if code != 0:
        raise SystemExit(f"calibration failed (exit {code}); see {runs_dir / 'calibration.log'}")
    calibration: dict[str, Any] = json.loads(path.read_text())
    calibration["seconds"] = seconds
    return calibration


def _select(suite: Suite, workload_names: Optional[str], config_names: Optional[str]) -> Suite:
    """The suite restricted to some workloads and configurations (to re-measure a few rows)."""
    keep_w = set(workload_names.split(",")) if workload_names else None
    keep_c = set(config_names.split(",")) if config_names else None
    plans = tuple(
        dataclasses.replace(plan, configs=tuple(c for c in plan.configs if keep_c is None or c in keep_c))
        for plan in suite.plans if keep_w is None or plan.workload in keep_w
    )
    plans = tuple(plan for plan in plans if plan.configs)
    if not plans:
        raise SystemExit("--workloads/--configs select nothing from this suite (see --dry-run without them)")
    return dataclasses.replace(suite, plans=plans)


def _finite(value: Any) -> Any:
    """JSON has no NaN/inf: they become ``null``."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _progress(index: int, total: int, result: dict[str, Any]) -> None:
    if result["status"] == "ok":
        detail = f"{result['samples_per_s']:,.0f} samples/s, final acc {result['final_accuracy']:.3f}"
    else:
        detail = (result.get("reason") or "").splitlines()[0][:120]
    seconds = result.get("process_s")
    took = f" ({seconds:.1f} s)" if seconds is not None else ""
    print(f"[{index:3d}/{total}] {result['workload']} {result['config']} r{result['repeat']}:"
          f" {result['status']} - {detail}{took}", flush=True)


def main(argv: Optional[list[str]] = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(raw)
    if args.rerender:
        return _rerender(Path(args.out))
    suite = _select(build_suite(args.suite, args.devices, args.accelerator), args.workloads, args.configs)
    configs = build_configs(args.devices)
    cifar10_dir = workloads.cifar10_path_argument(args.cifar10_dir)
    args.cifar10_dir = cifar10_dir
    unavailable = {p.workload: reason for p in suite.plans
                   if (reason := workloads.get(p.workload).unavailable_reason(cifar10_dir))}
    available = {p.workload for p in suite.plans} - set(unavailable)
    requests = plan_runs(suite, configs, available, args.repeats)
    if args.dry_run:
        for request in requests:
            print(request.run_id)
        print(f"{len(requests)} runs; unavailable workloads: {unavailable or 'none'}")
        return 0
    for workload, reason in unavailable.items():
        print(f"skipping workload {workload}: {reason}", flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / "runs", ignore_errors=True)  # only this tool's own per-run files
    (out / "runs").mkdir()
    started, wall_started = time.perf_counter(), datetime.now(timezone.utc)
    print(f"calibrating ({suite.name} suite, {len(requests)} runs planned) ...", flush=True)
    calibration = _calibrate(args, out, suite, configs, sorted(available))

    runner = Runner(out, {"seed": args.seed, "accelerator": args.accelerator, "warmup_epochs": WARMUP_EPOCHS,
                          "cifar10_dir": cifar10_dir}, suite.run_timeout_s)
    runs: list[dict[str, Any]] = []
    for index, request in enumerate(requests, start=1):
        result = runner.run(request)
        aggregate.add_derived(result, calibration)
        runs.append(result)
        _progress(index, len(requests), result)

    entries = []
    for plan in suite.plans:
        for name in plan.configs:
            mine = [r for r in runs if r["workload"] == plan.workload and r["config"] == name]
            entries.append(aggregate.configuration_entry(plan.workload, configs[name], mine,
                                                         unavailable.get(plan.workload)))
    aggregate.add_relative(entries, runs)
    straggler = (aggregate.straggler_rows(entries, runs, suite.straggler_workload, configs)
                 if suite.straggler_workload in available else [])
    results: dict[str, Any] = {
        "schema": 1,
        "suite": suite.name,
        "suite_description": suite.description,
        "command": "python -m benchmarks.run " + shlex.join(raw),
        "started_at": wall_started.strftime("%Y-%m-%d %H:%M"),
        "settings": {"seed": args.seed, "accelerator": args.accelerator, "devices": args.devices,
                     "repeats": args.repeats or suite.repeats, "warmup_epochs": WARMUP_EPOCHS,
                     "cifar10_dir": cifar10_dir},
        "calibration": calibration,
        "workloads": [_workload_entry(plan, calibration, unavailable.get(plan.workload)) for plan in suite.plans],
        "configurations": entries,
        "straggler": straggler,
        "runs": runs,
        "startup_s": aggregate.summarize(r.get("startup_s") for r in runs),
        "load_average": aggregate.summarize(r.get("load_before") for r in runs),
        "busy_before": aggregate.summarize(r.get("busy_before") for r in runs),
    }
    results["plots"] = []
    results["duration_s"] = time.perf_counter() - started  # measuring time; the report takes a few seconds more
    _write_report(results, out)
    (out / "results.json").write_text(json.dumps(_finite(results), indent=2))
    print(f"wrote {out / 'results.md'}, {out / 'results.json'} and {len(results['plots'])} plots"
          f" in {results['duration_s'] / 60:.1f} min", flush=True)
    return 0


def _write_report(results: dict[str, Any], out: Path) -> None:
    results["plots"] = plots.write_all(results, out)
    (out / "results.md").write_text(report.render(results))


def _rerender(out: Path) -> int:
    """Rewrite the markdown and the plots from ``results.json`` (after a change to the report, no re-measuring)."""
    results = json.loads((out / "results.json").read_text())
    _write_report(results, out)
    (out / "results.json").write_text(json.dumps(_finite(results), indent=2))
    print(f"rewrote {out / 'results.md'} and {len(results['plots'])} plots", flush=True)
    return 0


def _workload_entry(plan: WorkloadPlan, calibration: dict[str, Any], reason: Optional[str]) -> dict[str, Any]:
    workload = workloads.get(plan.workload)
    profile = calibration["workloads"].get(plan.workload, {})
    status = "skipped" if reason or profile.get("status") != "ok" else "ok"
    return {
        "name": workload.name, "description": workload.description, "status": status,
        "reason": reason or profile.get("reason"), "target_accuracy": target_of(plan),
        "batch_size": workload.batch_size, "epochs": plan.epochs, "train_limit": plan.train_limit,
        "val_limit": plan.val_limit, "val_check_interval": plan.val_check_interval,
        "profile": profile if status == "ok" else None,
    }


if __name__ == "__main__":
    sys.exit(main())
