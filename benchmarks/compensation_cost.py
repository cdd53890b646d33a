"""What the default's staleness compensation and divergence guard cost, as a share of the process's CPU time.

Issue #20 asks that the two cost at most 3% of throughput. On this 2-core machine the step times of one
configuration vary by 10% and more between runs, so a 3% difference cannot be read off timings. This measures the
CPU time itself: the default mode on ``benchmarks.engine_overhead``'s MLPs, with every call into the compensation
(``fill`` on the loop thread, ``before_step`` on the backward threads) and into the guard (``observe``, ``keep``,
``due_for_snapshot``) timed by its thread's CPU clock (``time.thread_time``: a thread waiting for the GIL or a lock
is not counted), against the whole process's CPU time over the same steps. With every core busy, that share is the
share of throughput they take. Not in it: the pipeline drain the guard makes every 200 steps to keep a good state
(idle time, not CPU).

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
from lightning_pdasgd.engine.compensation import DEFAULT_STALENESS_COMPENSATION, WeightPrediction
from lightning_pdasgd.engine.divergence_guard import DivergenceGuard


class _CpuClock:
    """CPU seconds spent inside the timed calls, by part, summed over threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.seconds: dict[str, float] = {"compensation": 0.0, "guard": 0.0}
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


def _guard_timed() -> Callable[[], None]:
    """Time the guard's per-step calls (class-wide, for this process's runs); returns the undo."""
    originals = {name: getattr(DivergenceGuard, name) for name in ("observe", "keep", "due_for_snapshot")}
    for name, method in originals.items():
        setattr(DivergenceGuard, name,
                lambda self, *args, _method=method, **kwargs: CLOCK.timed("guard", _method, self, *args, **kwargs))
    return lambda: [setattr(DivergenceGuard, name, method) for name, method in originals.items()]


def measure(steps: int, warmup: int, repeats: int) -> dict[str, Any]:
    assert DEFAULT_STALENESS_COMPENSATION == "predict", "time the default compensation"
    undo = _guard_timed()
    results: dict[str, Any] = {}
    try:
        for mlp in MLPS:
            shares: dict[str, list[float]] = {"compensation": [], "guard": []}
            per_step: dict[str, list[float]] = {"compensation": [], "guard": []}
            for repeat in range(repeats):
                cpu = _ProcessCpu(warmup)
                strategy = PDASGDStrategy(synchronous_warmup=warmup, staleness_compensation=_TimedPrediction())
                time_one(mlp, "default", steps, warmup, seed=repeat, strategy=strategy, callbacks=(cpu,))
                CLOCK.counting = False
                for part, seconds in CLOCK.seconds.items():
                    shares[part].append(seconds / cpu.seconds)
                    per_step[part].append(seconds / steps * 1e6)
            results[mlp.name] = {
                part: {"cpu_share": round(statistics.median(shares[part]), 4),
                       "cpu_us_per_step": round(statistics.median(per_step[part]), 1),
                       "runs": [round(share, 4) for share in shares[part]]}
                for part in shares
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
            print(f"{name:11s} {part:13s} {row['cpu_share']:7.2%} of the process's CPU time"
                  f"  ({row['cpu_us_per_step']:7.1f} us per step; runs {row['runs']})")
    if args.out:
        write_results(args.out, args, results)


if __name__ == "__main__":
    main()
