"""Runs each measurement in its own fresh subprocess and collects the JSON it writes.

The parent never imports torch or Lightning for a measured run, so nothing (thread pools, ``set_num_threads``,
process groups, allocator state) can carry over from one configuration to the next. A run that crashes, hangs
past its timeout or writes nothing becomes an ``error`` row with the tail of its log; the suite goes on.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from benchmarks.configs import Config

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class RunRequest:
    """One measured run: a configuration of a workload, at one repeat index."""

    workload: str
    config: Config
    repeat: int
    epochs: int
    train_limit: Optional[int] = None
    val_limit: Optional[int] = None
    val_check_interval: float = 1.0
    target_accuracy: float = 0.0

    @property
    def run_id(self) -> str:
        safe = self.config.name.replace(":", "_")
        return f"{self.workload}__{safe}__r{self.repeat}"


def _environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env.setdefault("PYTHONWARNINGS", "ignore")  # keeps the per-run logs readable; results do not depend on it
    return env


def _cpu_times() -> Optional[tuple[int, int]]:
    """(busy, total) jiffies of all CPUs from /proc/stat; None where there is no /proc."""
    try:
        with open("/proc/stat", encoding="ascii") as handle:
            fields = [int(v) for v in handle.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def machine_busy_fraction(seconds: float = 0.3) -> Optional[float]:
    """Share of all cores that other processes kept busy during a short quiet window (none of ours runs).

    Taken before every run: the benchmark cannot control other load on a shared machine, but it can show it.
    """
    before = _cpu_times()
    time.sleep(seconds)
    after = _cpu_times()
    if before is None or after is None or after[1] == before[1]:
        return None
    return (after[0] - before[0]) / (after[1] - before[1])


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def run_module(args: list[str], log_path: Path, timeout_s: float) -> tuple[Optional[int], float]:
    """``python -m <args>`` from the repository root in a new session; returns (exit code or None on timeout, s)."""
    started = time.perf_counter()
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", *args], cwd=REPO_ROOT, env=_environment(), stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: a timeout kills Lightning's extra ranks too
        )
        try:
            code: Optional[int] = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            code = None
    # ranks Lightning launched may outlive rank 0 by a moment; end the ones still in this run's group
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except OSError:  # the group is gone: every rank has exited
        pass
    return code, time.perf_counter() - started


class Runner:
    """Launches runs, remembers setup refusals per skip group so a refused setting is not re-measured."""

    def __init__(self, out_dir: Path, common: dict[str, Any], timeout_s: float) -> None:
        self.runs_dir = out_dir / "runs"
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self.common = common  # seed, accelerator, warmup_epochs, cifar10_dir
        self.timeout_s = timeout_s
        self._refused: dict[str, tuple[str, str]] = {}  # skip group -> (reason, run id that was refused)

    def run(self, request: RunRequest) -> dict[str, Any]:
        base: dict[str, Any] = {"run_id": request.run_id, "workload": request.workload,
                                "config": request.config.name, "repeat": request.repeat}
        refused = self._refused.get(request.config.skip_group)
        if refused is not None:
            reason, source = refused
            return {**base, "status": "skipped", "reason": reason, "skip_inferred_from": source}
        out = self.runs_dir / f"{request.run_id}.json"
        out.unlink(missing_ok=True)
        spec = {**self.common, **base, "config": request.config.to_dict(), "epochs": request.epochs,
                "train_limit": request.train_limit, "val_limit": request.val_limit,
                "val_check_interval": request.val_check_interval, "target_accuracy": request.target_accuracy,
                "out": str(out),
                "spawned_at": time.time()}
        spec_path = self.runs_dir / f"{request.run_id}.spec.json"
        spec_path.write_text(json.dumps(spec, indent=2))
        load_before = os.getloadavg()[0]
        busy_before = machine_busy_fraction()
        log_path = self.runs_dir / f"{request.run_id}.log"
        code, seconds = run_module(["benchmarks.worker", str(spec_path)], log_path, self.timeout_s)
        result: dict[str, Any]
        if out.is_file():
            result = json.loads(out.read_text())
        elif code is None:
            result = {**base, "status": "error", "reason": f"timed out after {self.timeout_s:.0f} s"}
        else:
            result = {**base, "status": "error",
                      "reason": f"exit code {code}, no result written; log tail:\n{_tail(log_path)}"}
        result.update(process_s=seconds, exit_code=code, load_before=load_before, load_after=os.getloadavg()[0],
                      busy_before=busy_before)
        if result["status"] == "skipped":
            self._refused[request.config.skip_group] = (result["reason"], request.run_id)
        out.write_text(json.dumps(result, indent=2))
        return result
