"""What the default's staleness compensation and divergence guard cost, as a share of the process's CPU time.

Issue #20 asks that the two cost at most 3% of throughput. On this 2-core machine the step times of one
configuration vary by 10% and more between runs, so a 3% difference cannot be read off timings. This measures the
CPU time itself: the default mode on ``benchmarks.engine_overhead``'s MLPs, with every call into the compensation
(``fill`` on the loop thread; ``before_step`` and the velocity read from heavy-ball SGD on the backward threads)
and into the guard (``observe``, ``keep``, ``due_for_snapshot``) timed by its thread's CPU clock
(``time.thread_time``: a thread waiting for the GIL or a lock is not counted), against the whole process's CPU time
over the same steps. With every core busy, that share is the share of throughput they take. Not in it: the
pipeline drain the guard makes every 200 steps to keep a good state (idle time, not CPU).

The calls are the gross cost. The net cost subtracts what the compensation saves: its forward reads a filled
buffer, so an update finds the live weights unread and writes them in place, where with ``"none"`` a forward
aliases the live weights and an update copies the bucket first (copy-on-write, ``ParameterBucket._spare_copy``).
Each repeat also runs ``staleness_compensation="none"`` with the guard off (the issue's baseline) and times its
copies the same way; net = (compensation + guard + the default's copies) - the baseline's copies, per step.

    python -m benchmarks.compensation_cost --repeats 3 --out benchmarks/results/compensation_cost/cpu-2core.json
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import lightning as L

from benchmarks.engine_overhead import MLPS, run_arguments, time_one, write_results
from lightning_pdasgd import PDASGDStrategy
from lightning_pdasgd.engine.bucket_optimizer import BucketOptimizer
from lightning_pdasgd.engine.compensation import DEFAULT_STALENESS_COMPENSATION, WeightPrediction
from lightning_pdasgd.engine.divergence_guard import DivergenceGuard
from lightning_pdasgd.engine.parameter_buckets import ParameterBucket

PARTS = ("compensation", "guard", "copy_on_write")


class _CpuClock:
    """CPU seconds spent inside the timed calls, by part, summed over threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.seconds: dict[str, float] = dict.fromkeys(PARTS, 0.0)
        self.counting = False

    def timed(self, part: str, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        started = time.thread_time()
        try:
            return call(*args, **kwargs)
        finally:
            if self.counting:
                spent = time.thread_time() - started
                with self._lock:
                    self.seconds[part] += spent


CLOCK = _CpuClock()


class _TimedPrediction(WeightPrediction):
    """The default compensation (weight prediction), its calls timed."""

    def fill(self, *args: Any) -> None:
        CLOCK.timed("compensation", super().fill, *args)

    def before_step(self, *args: Any) -> Any:
        return CLOCK.timed("compensation", super().before_step, *args)

    def wants_fill(self, *args: Any) -> bool:
        return CLOCK.timed("compensation", super().wants_fill, *args)

    def observe_velocity(self, *args: Any) -> None:
        CLOCK.timed("compensation", super().observe_velocity, *args)


class _ProcessCpu(L.Callback):
    """The process's CPU seconds over the steps after the warm-up; starts and stops the clock of the parts."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.started = self.seconds = 0.0

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.warmup:
            CLOCK.seconds = {part: 0.0 for part in CLOCK.seconds}
            CLOCK.counting = True
            self.started = time.process_time()

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step > self.warmup:
            self.seconds = time.process_time() - self.started


def _calls_timed() -> Callable[[], None]:
    """Time the guard's per-step calls and the buckets' copy-on-write copies (class-wide, for this process's
    runs); returns the undo."""
    timed = [(DivergenceGuard, name, "guard") for name in ("observe", "keep", "due_for_snapshot")]
    timed.append((BucketOptimizer, "heavy_ball_velocity", "compensation"))  # read for prediction only
    timed.append((ParameterBucket, "_spare_copy", "copy_on_write"))
    originals = [(owner, name, part, getattr(owner, name)) for owner, name, part in timed]
    for owner, name, part, method in originals:
        setattr(owner, name,
                lambda self, *args, _method=method, _part=part, **kwargs: CLOCK.timed(_part, _method, self, *args,
                                                                                       **kwargs))
    return lambda: [setattr(owner, name, method) for owner, name, _, method in originals]


def _timed_parts(mlp: Any, steps: int, warmup: int, seed: int, strategy: PDASGDStrategy) -> dict[str, float]:
    """One run: each part's CPU seconds per step, and the whole process's (``"process"``)."""
    cpu = _ProcessCpu(warmup)
    time_one(mlp, "default", steps, warmup, seed=seed, strategy=strategy, callbacks=(cpu,))
    CLOCK.counting = False
    return {**{part: seconds / steps for part, seconds in CLOCK.seconds.items()}, "process": cpu.seconds / steps}


def measure(steps: int, warmup: int, repeats: int) -> dict[str, Any]:
    assert DEFAULT_STALENESS_COMPENSATION == "predict", "time the default compensation"
    undo = _calls_timed()
    results: dict[str, Any] = {}
    try:
        for mlp in MLPS:
            shares: dict[str, list[float]] = {part: [] for part in (*PARTS, "net")}
            per_step: dict[str, list[float]] = {
                part: [] for part in (*PARTS, "net", "baseline copy_on_write", "process", "baseline process")
            }
            for repeat in range(repeats):  # interleaved: the default, then the baseline, on the same seed
                default = _timed_parts(mlp, steps, warmup, repeat, PDASGDStrategy(
                    synchronous_warmup=warmup, staleness_compensation=_TimedPrediction()))
                baseline = _timed_parts(mlp, steps, warmup, repeat, PDASGDStrategy(
                    synchronous_warmup=warmup, staleness_compensation="none", divergence_guard=False))
                net = sum(default[part] for part in PARTS) - baseline["copy_on_write"]
                for part, seconds in (*((part, default[part]) for part in PARTS), ("net", net)):
                    shares[part].append(seconds / default["process"])
                    per_step[part].append(seconds * 1e6)
                per_step["baseline copy_on_write"].append(baseline["copy_on_write"] * 1e6)
                per_step["process"].append(default["process"] * 1e6)  # the whole process, for scale (noisy)
                per_step["baseline process"].append(baseline["process"] * 1e6)
            results[mlp.name] = {
                part: {"cpu_share": round(statistics.median(shares[part]), 4) if part in shares else None,
                       "cpu_us_per_step": round(statistics.median(per_step[part]), 1),
                       "runs_us": [round(value, 1) for value in per_step[part]]}
                for part in per_step
            }
    finally:
        CLOCK.counting = False
        undo()
    return results


def main() -> None:
    args = run_arguments(__doc__.splitlines()[0]).parse_args()
    results = measure(args.steps, args.warmup, args.repeats)
    for name, parts in results.items():
        for part, row in parts.items():
            share = f"{row['cpu_share']:7.2%} of the process's CPU time" if row["cpu_share"] is not None else " " * 33
            print(f"{name:11s} {part:22s} {share}  ({row['cpu_us_per_step']:7.1f} us per step; runs {row['runs_us']})")
        ratios = [a / b for a, b in zip(parts["process"]["runs_us"], parts["baseline process"]["runs_us"])]
        print(f"{name:11s} the process's CPU per step, default / baseline, paired: median"
              f" {statistics.median(ratios):.3f}, runs {[round(ratio, 3) for ratio in ratios]}")
    if args.out:
        write_results(args.out, args, results)


if __name__ == "__main__":
    main()
