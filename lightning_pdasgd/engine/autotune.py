"""Choosing the forward:backward thread ratio (and intra-op threads) for the user's model on the user's device.

Decoupling pays only where a sequential loop leaves compute idle, and what is idle depends on the model, the batch,
the device and the cores. Rather than model that, the tuner measures it: the first training steps of the run are
spent in short trials, one per candidate configuration, each timed on the real batches with real updates (no step
is wasted), and the fastest candidate whose mean staleness stays within a bound is kept for the rest of the run.
One candidate is the plain synchronous Lightning step (no engine at all), so when decoupling cannot pay -- e.g. a
CPU whose cores a plain loop already saturates -- the tuner falls back to exactly what plain Lightning does.

The core budget, the thread counts every configuration starts from: the engine's threads together use the machine's
cores once, not once each. torch gives every thread that runs an operator its own intra-op team (OpenMP on CPU),
sized by ``torch.set_num_threads`` as seen by that thread. A plain loop runs one thread with a team as large as the
machine; PD-ASGD runs a forward thread and several backward threads at once, and if each kept the full team the
cores would be oversubscribed (measured on 2 cores: 1 forward + 2 backward threads with 2 intra-op threads each ran
at 0.6x plain; with 1 each at 1.34x a plain loop on 1 thread). Each engine thread therefore gets an equal share of
the cores among the threads that can compute at the same moment.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


def concurrent_threads(backward_threads: int, max_in_flight: int) -> int:
    """How many engine threads can compute at once: the forward and the backwards that have work.

    With ``max_in_flight=1`` the next forward waits for the previous backward, so only one thread computes.
    """
    if max_in_flight <= 1:
        return 1
    return 1 + min(backward_threads, max_in_flight)


def intra_op_threads_per_thread(cores: int, backward_threads: int, max_in_flight: int) -> int:
    """Intra-op threads for each engine thread: the cores split over the threads that compute together."""
    return max(1, cores // concurrent_threads(backward_threads, max_in_flight))


def backward_threads_within_cores(backward_threads: int, device: torch.device, cores: int) -> int:
    """The default backward thread count on ``device``: on a CPU, no more engine threads computing at once than cores.

    The paper's 1:2 is for accelerators, where a backward thread mostly launches kernels. On a CPU every engine thread
    computes, and the forward thread is the pipeline's critical path (it also runs Lightning's loop, the data and the
    reads). On 2 cores a forward and two backward threads took turns on the cores: the backward threads waited for
    work 60% of the time while the forward shared its core. One backward thread with the same two losses in flight
    keeps a core each (``benchmarks/engine_overhead.py``: 784-1024-1024-10 MLP 0.88x plain against 0.67x).
    """
    if device.type != "cpu":
        return backward_threads
    return max(1, min(backward_threads, cores - 1))


@dataclass(frozen=True)
class Candidate:
    """``backward_threads == 0`` means the plain synchronous step; ``intra_op_threads`` None: the core budget.

    The core budget splits the cores over the engine threads that compute at once (``intra_op_threads_per_thread``);
    the plain step uses every core, as a plain Lightning loop does.
    """

    backward_threads: int
    intra_op_threads: int | None

    @property
    def synchronous(self) -> bool:
        return self.backward_threads == 0

    def __str__(self) -> str:
        threads = "plain synchronous step" if self.synchronous else f"1:{self.backward_threads}"
        return threads + (f", {self.intra_op_threads} intra-op" if self.intra_op_threads else "")


@dataclass
class Trial:
    candidate: Candidate
    completed: int = 0  # steps of this trial that finished
    started_at: float | None = None  # end of the first step: it absorbs the switch and is not timed
    seconds: float = 0.0
    staleness: float = 0.0
    dropped: bool = False  # ended before `steps_per_trial` because it was clearly slower than the best so far

    @property
    def steps_per_second(self) -> float:
        timed = self.completed - 1
        return timed / self.seconds if self.seconds > 0 and timed > 0 else 0.0


def default_candidates(device: torch.device, allow_synchronous: bool, max_backward_threads: int = 3) -> list[Candidate]:
    """Candidates worth timing on ``device``.

    On CPU the backward threads compete with torch's intra-op threads for the same cores, so each thread count is
    tried with the core budget and with every core per thread; on a GPU intra-op threads barely matter.
    """
    cores = torch.get_num_threads() or os.cpu_count() or 1
    candidates: list[Candidate] = [Candidate(0, None)] if allow_synchronous else []
    for threads in range(1, max_backward_threads + 1):
        candidates.append(Candidate(threads, None))
        if device.type == "cpu" and cores > 1:
            candidates.append(Candidate(threads, cores))
    return candidates


# A trial running at less than this fraction of the best finished trial's rate after two timed steps ends early.
# Those two steps flatter an asynchronous candidate (the clock stops with backwards still in flight), so one
# measured below it would not have won: on the 2-core CPU of `benchmarks.engine_overhead` the asynchronous candidates
# that ran their six steps there (at 0.50-0.56x the plain step's rate) never came within 40% of it, and cost the
# small MLP's run 2% of its time.
DROP_BELOW = 0.75
TRIAL_SHARE = 0.1  # the most of a run's steps the trials may take


def plan_trials(
    candidates: list[Candidate], steps_per_trial: int, run_steps: float
) -> tuple[list[Candidate], int] | None:
    """Fit the trials into ``TRIAL_SHARE`` of a run of ``run_steps`` steps (``inf``: unknown, no limit).

    Fewer steps per trial first (down to 2), then only the core-budget candidates; ``None`` when even that does
    not fit: the run is too short to be worth tuning.
    """
    if run_steps == float("inf"):
        return candidates, steps_per_trial
    allowed = TRIAL_SHARE * run_steps
    for pool in (candidates, [candidate for candidate in candidates if candidate.intra_op_threads is None]):
        steps = min(steps_per_trial, int(allowed // max(len(pool), 1)))
        if steps >= 2:
            return pool, steps
    return None


@dataclass
class ThreadAutotuner:
    """Runs the trials; the strategy asks it before every training step which configuration to use."""

    candidates: list[Candidate]
    steps_per_trial: int = 6
    max_staleness: float = 4.0
    trials: list[Trial] = field(default_factory=list)
    skipped: list[Candidate] = field(default_factory=list)  # not timed: more threads than a count that did not pay
    chosen: Candidate | None = None
    clock: Callable[[], float] = time.perf_counter  # injected by tests: trials are timed with it
    # waits for the backward passes in flight (the engine's ``drain``): a trial's clock starts and stops with none,
    # so that it is charged exactly its own steps' backwards, not the previous candidate's nor left to the next one
    drain: Callable[[], None] = lambda: None
    _staleness_mark: tuple[int, int] = (0, 0)

    def __post_init__(self) -> None:
        if not self.candidates:
            raise ValueError("ThreadAutotuner needs at least one candidate")
        if self.steps_per_trial < 2:
            raise ValueError("`autotune_steps` must be >= 2 (the first step of each trial is not timed)")

    @property
    def done(self) -> bool:
        return self.chosen is not None

    def before_step(self, staleness_so_far: tuple[int, int]) -> Candidate | None:
        """Called before each training step; returns a configuration to switch to now, or None to keep the current.

        ``staleness_so_far`` is (sum of staleness, number of updates) since the start of fit.
        """
        if self.chosen is not None:
            return None
        now = self.clock()
        trial = self.trials[-1] if self.trials else None
        if trial is not None:
            trial.completed += 1
            if trial.completed == 1:
                self.drain()
                trial.started_at = self.clock()
                self._staleness_mark = staleness_so_far
            if trial.completed < self.steps_per_trial and not self._clearly_slower(trial, now):
                return None
            assert trial.started_at is not None
            trial.dropped = trial.completed < self.steps_per_trial
            self.drain()  # (the caller drains at the switch anyway)
            trial.seconds = self.clock() - trial.started_at
            trial.staleness = self._staleness_since(trial, staleness_so_far)
        while len(self.trials) + len(self.skipped) < len(self.candidates):
            candidate = self.candidates[len(self.trials) + len(self.skipped)]
            if self._past_the_peak(candidate):
                self.skipped.append(candidate)
                continue
            self.trials.append(Trial(candidate))
            return candidate
        self.chosen = self._choose()
        return self.chosen

    def _past_the_peak(self, candidate: Candidate) -> bool:
        """More backward threads pay while they add overlap and cost once they only add contention, so a count
        whose best trial was no faster than the count below it ends the climb: higher counts are not timed."""
        best: dict[int, float] = {}
        for trial in self.trials:
            if not trial.candidate.synchronous:
                count = trial.candidate.backward_threads
                best[count] = max(best.get(count, 0.0), trial.steps_per_second)
        counts = sorted(best)
        return any(
            higher < candidate.backward_threads and best[higher] <= best[lower]
            for lower, higher in zip(counts, counts[1:])
        )

    def _clearly_slower(self, trial: Trial, now: float) -> bool:
        """After two timed steps, a candidate below ``DROP_BELOW`` of the best finished trial's rate is dropped."""
        timed = trial.completed - 1
        if timed < 2 or trial.started_at is None or now <= trial.started_at:
            return False
        best = max((other.steps_per_second for other in self.trials[:-1]), default=0.0)
        return timed / (now - trial.started_at) < DROP_BELOW * best

    def _staleness_since(self, trial: Trial, now: tuple[int, int]) -> float:
        total, count = now[0] - self._staleness_mark[0], now[1] - self._staleness_mark[1]
        return total / count if count else 0.0

    def _choose(self) -> Candidate:
        eligible = [trial for trial in self.trials if trial.staleness <= self.max_staleness] or self.trials
        return max(eligible, key=lambda trial: trial.steps_per_second).candidate

    def report(self) -> str:
        lines = [f"PD-ASGD autotune: chose {self.chosen} (max mean staleness {self.max_staleness:g})"]
        for trial in self.trials:
            mark = "*" if trial.candidate == self.chosen else " "
            lines.append(
                f" {mark} {str(trial.candidate):<32} {trial.steps_per_second:9.1f} steps/s"
                f"   staleness {trial.staleness:.2f}" + ("   (dropped early: clearly slower)" if trial.dropped else "")
            )
        for candidate in self.skipped:
            lines.append(f"   {str(candidate):<32} not timed: fewer backward threads were as fast")
        return "\n".join(lines)
