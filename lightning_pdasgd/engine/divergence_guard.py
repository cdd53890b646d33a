"""The divergence guard: never a silently diverged model.

Why: one step of staleness shrinks the stable learning-rate region of momentum SGD several times (a stability
calculation: 38x for heavy-ball 0.9), so a learning rate tuned for plain Lightning can sit beyond the asynchronous
edge. Compensation keeps most runs inside; where it cannot, a run must not end at chance accuracy without a word.

The guard watches the training loss against its own recent history: a smoothed loss that climbs to ``factor``
times the best smoothed loss of the run, or to ``factor`` times the run's first losses (from the first steps on, when
there is no best yet), is a blow-up, and so is a loss whose recent median undid half the run's progress and stays
there (``LossWatch._relapsed``; in a fit that starts at step 0, on one device). A NaN/Inf loss or gradient is the
``nonfinite`` policy's: an error naming the step by default. The session then restores the last
good weights, buffers and optimizer state (kept at consistent points and, on one device, every ``snapshot_every``
steps while the loss is healthy), halves ``max_in_flight`` (down to one loss in flight: exactly plain Lightning's
updates) and warns once with the numbers. A blow-up with one loss in flight is the learning rate's, not the
asynchrony's (plain Lightning diverges there too): the guard then warns so and stops watching, and the run goes on
as plain Lightning's would.
"""

from __future__ import annotations

import copy
import logging
import math
import statistics
import warnings
from collections import deque
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

log = logging.getLogger(__name__)

DEFAULT_FACTOR = 3.0  # a smoothed loss this many times the best one is a blow-up
DEFAULT_SMOOTHING_STEPS = 20  # the span of the loss's exponential moving average
DEFAULT_WARMUP_STEPS = 20  # losses observed before a rise can count (the first ones move fast)
DEFAULT_SNAPSHOT_EVERY = 200  # one device: steps between snapshots of the last good state
HEALTHY_FACTOR = 1.5  # a snapshot is taken only while the smoothed loss is within this factor of the best
DEFAULT_RECLAIM = 0.5  # and the rise undid at least this share of the progress since the start
EARLY_BASE_STEPS = 2  # a rise from where the run started is measured from the highest of its first losses ...
EARLY_RECENT_STEPS = 5  # ... and must hold for the median of this many latest losses as well as for the average,
EARLY_MIN_STEPS = 10  # ... from this many losses on, all of them positive (an objective that reaches 0 or below,
# such as a loss linear in the weights, is unbounded: no multiple of its first values says it diverged)
RELAPSE_PROGRESS = 0.5  # a relapse counts once the median of the latest losses fell to this share of the first ones
RELAPSE_UNDONE = 0.5  # ... and it is one when the median undid this share of the fall from the start,
RELAPSE_SMOOTHED_UNDONE = 0.25  # ... the moving average this share (it lags a fast fall),
RELAPSE_STEPS = 4  # ... on this many consecutive steps


@dataclass
class Trip:
    """One blow-up the guard saw."""

    reason: str
    best: float
    now: float
    baseline: str = "best smoothed loss"  # what ``best`` is
    # a rise from the run's best counts only with the gradient norm up too (an objective that wanders upwards is no
    # blow-up); a loss 3x where the run started counts alone (with BatchNorm the gradients may even shrink)
    needs_gradients: bool = True


class LossWatch:
    """The loss's moving average against the best it reached: decides when a loss is a blow-up."""

    def __init__(
        self,
        factor: float = DEFAULT_FACTOR,
        smoothing_steps: int = DEFAULT_SMOOTHING_STEPS,
        warmup_steps: int = DEFAULT_WARMUP_STEPS,
        reclaim: float = DEFAULT_RECLAIM,
        relapse: bool = True,
    ) -> None:
        if not factor > 1.0:
            raise ValueError(f"the guard's `factor` must be > 1, got {factor!r}.")
        self.factor = factor
        self.reclaim = reclaim
        self._alpha = 2.0 / (smoothing_steps + 1)
        self._warmup = warmup_steps
        self.start = -math.inf  # the highest smoothed value of the first warm-up: where the run started
        self.first = -math.inf  # the highest of the run's first losses: the level an early blow-up is measured from
        self.start_median = -math.inf  # the highest median of ``EARLY_RECENT_STEPS`` losses in the first warm-up
        self._firsts_seen = 0
        self._all_positive = True  # every loss since the start was > 0: ``first`` is a scale
        self._recent: deque[float] = deque(maxlen=EARLY_RECENT_STEPS)
        # the relapse rule measures progress from where the run started: only a run that started untrained has a
        # start far above its noise (a resumed run's noise alone undoes "half" of its progress in half the cases);
        # once disarmed, it stays so and costs nothing
        self.relapse_armed = relapse
        self.reset()

    def rebase(self) -> None:
        """Forget where the run started too (the weights were changed from outside: pruning, a reset)."""
        self.start = self.first = self.start_median = -math.inf
        self._firsts_seen = 0
        self._all_positive = True
        self.relapse_armed = False  # the weights changed from outside: the new start is no untrained model's
        self.reset()

    def reset(self) -> None:
        """Start over (after a restore: the history before it no longer describes the run); the level the run
        started at is kept."""
        self.smoothed: Optional[float] = None
        self.best = math.inf
        self.seen = 0
        self._recent.clear()
        self.lowest_recent = math.inf  # the lowest median of the latest ``EARLY_RECENT_STEPS`` losses
        self._relapse_steps = 0  # consecutive steps that looked like a relapse

    @property
    def rising(self) -> bool:
        """Past the warm-up, the smoothed value ``factor`` times its best, and up by at least ``reclaim`` of the
        way back to where the run started. The second condition keeps a loss that converged towards zero from
        tripping on its noise (3x of almost nothing); a positive best is needed (a loss that can go negative has no
        scale to compare against, and is never called a blow-up). ``above_first`` is the other rule, checked apart:
        only this one is the gradient norm's condition for a rise from the best."""
        if self.smoothed is None or self.seen < self._warmup or not 0 < self.best < math.inf:
            return False
        undone = self.smoothed - self.best >= self.reclaim * (self.start - self.best)
        return self.smoothed > self.factor * self.best and undone

    @property
    def above_first(self) -> bool:
        """The smoothed value and the median of the latest values both ``factor`` times the highest of the run's
        first values. It catches a blow-up in the first steps, before there is a best to compare with (one step of
        delay on every layer takes a deep BatchNorm network's loss from 2.4 to 22 within 12 steps), and one that
        follows a rise inside the warm-up, which would otherwise count as where the run started. The highest of
        the first values, so that one low first batch is no baseline; the median, so that one noisy batch is no
        blow-up. Only for a loss that has been positive throughout (cross-entropy, squared errors): an objective that
        reaches 0 or below has no scale, and may grow without diverging."""
        if self.smoothed is None or self.seen < EARLY_MIN_STEPS or not self._all_positive or not self.first < math.inf:
            return False
        level = self.factor * self.first
        return self.smoothed > level and statistics.median(self._recent) > level

    def _relapsed(self, recent_median: float) -> bool:
        """The run undid half its progress, on ``RELAPSE_STEPS`` consecutive steps: the median of the latest losses
        climbed ``RELAPSE_UNDONE`` of the way from the lowest such median back to where the run started (the
        highest in the first warm-up), after the run had halved its loss. A blow-up the smoothed value misses as
        ``factor`` times its best, since it lags a fast fall: a module applied three times per forward (SGD lr
        0.05, momentum 0.9, which plain Lightning trains with) jumped from 0.8 to 2.7-7.7 within a few steps of
        asynchrony and stayed at 1.6-2.5, while its moving average reached 1.2-2.1x its best; it ended at
        0.74-0.93 accuracy against plain's 0.92-0.96. Healthy training does not undo half its progress (one batch
        may; the median of five on four steps running does not: one trip in 3,000 runs of a falling loss with
        exponential noise as large as its level, the worst case in ``tests/test_guard.py``). Only for a loss
        positive throughout, as ``above_first``."""
        lowest, start = self.lowest_recent, self.start_median
        assert self.smoothed is not None
        relapsing = (
            self._all_positive
            and lowest <= RELAPSE_PROGRESS * start
            and recent_median >= lowest + RELAPSE_UNDONE * (start - lowest)
            and self.smoothed >= lowest + RELAPSE_SMOOTHED_UNDONE * (start - lowest)
        )
        self._relapse_steps = self._relapse_steps + 1 if relapsing else 0
        return self._relapse_steps >= RELAPSE_STEPS

    @property
    def healthy(self) -> bool:
        """Past the warm-up and near the best loss: a good moment to keep the state."""
        return (
            self.smoothed is not None and self.seen >= self._warmup and self.smoothed <= HEALTHY_FACTOR * self.best
        )

    def observe(self, loss: float) -> Optional[Trip]:
        """Fold in one step's loss; a ``Trip`` when it is a blow-up. A NaN/Inf loss is left to the ``nonfinite``
        policy (an error naming the step by default), which acts on it in the same step."""
        if not math.isfinite(loss):
            return None
        self.seen += 1
        self.smoothed = loss if self.smoothed is None else self.smoothed + self._alpha * (loss - self.smoothed)
        self._recent.append(loss)
        self._all_positive = self._all_positive and loss > 0
        if self._firsts_seen < EARLY_BASE_STEPS:
            self._firsts_seen += 1
            self.first = max(self.first, loss)
        if self.above_first:
            return Trip(f"the smoothed loss rose above {self.factor:g}x the run's first losses", self.first,
                        self.smoothed, "first loss", needs_gradients=False)
        full = self.relapse_armed and len(self._recent) == EARLY_RECENT_STEPS
        recent_median = sorted(self._recent)[EARLY_RECENT_STEPS // 2] if full else None
        if recent_median is not None and self.seen >= self._warmup:
            if self._relapsed(recent_median):
                return Trip(f"the median of the latest {EARLY_RECENT_STEPS} losses undid {RELAPSE_UNDONE:.0%} or more"
                            f" of the fall from where the run started ({self.start_median:.4g}) on {RELAPSE_STEPS}"
                            " steps running", self.lowest_recent, recent_median, "lowest such median",
                            needs_gradients=False)
            self.lowest_recent = min(self.lowest_recent, recent_median)
        if self.seen < self._warmup:
            if self.best == math.inf:  # the first warm-up only (a restore keeps where the run started)
                self.start = max(self.start, self.smoothed)
                if recent_median is not None:
                    self.start_median = max(self.start_median, recent_median)
            return None
        self.best = min(self.best, self.smoothed)
        if self.rising:
            return Trip(f"the smoothed loss rose above {self.factor:g}x its best", self.best, self.smoothed)
        return None


@dataclass
class GoodState:
    """What a restore puts back: the module's parameters and buffers, and the optimizer's per-parameter state.

    The param groups (learning rates, set by schedulers) are not rolled back: the schedule goes on by step.
    """

    module: dict[str, Tensor]
    optimizer_state: dict[Any, Any]
    step: int

    @classmethod
    def take(cls, module: nn.Module, optimizer: Optimizer, step: int) -> GoodState:
        """A copy of the state now (the caller has drained: nothing is being updated)."""
        with torch.no_grad():
            tensors = {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}
        return cls(tensors, copy.deepcopy(optimizer.state_dict()["state"]), step)

    def restore(self, module: nn.Module, optimizer: Optimizer) -> None:
        """Put the state back (the caller has drained); the optimizer keeps its current hyperparameters."""
        module.load_state_dict(self.module, strict=False)
        current = optimizer.state_dict()
        state = copy.deepcopy(self.optimizer_state)
        optimizer.load_state_dict({"state": state, "param_groups": current["param_groups"]})


class LossReader:
    """Loss values on the host without a synchronisation per step: on CUDA each loss is copied to pinned memory
    asynchronously and read once its copy has completed (a step or two late); on CPU at once."""

    def __init__(self) -> None:
        self._pending: list[tuple[Any, Tensor]] = []

    def push(self, loss: Tensor, host_value: Optional[float] = None) -> list[float]:
        """Queue this step's loss; returns the values that are ready, oldest first. ``host_value``: a CPU loss's
        value, already read by the caller (each read gives the GIL up and takes it back from busy threads)."""
        if not loss.is_cuda:
            if host_value is not None:
                return [host_value]
            return [loss.item() if loss.dim() == 0 else float(loss.detach().float().sum())]
        value = loss.detach()
        host = torch.empty((), dtype=torch.float32, pin_memory=True)
        host.copy_(value.float().sum(), non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._pending.append((event, host))
        ready = []
        while self._pending and self._pending[0][0].query():
            ready.append(float(self._pending.pop(0)[1]))
        return ready


class DivergenceGuard:
    """One fit's guard: the loss watch, the last good state, and what to do on a blow-up.

    The session calls ``observe`` with every handed-off loss, ``keep`` where the state is consistent (drained,
    and with several devices identical on every rank), and ``due_for_snapshot`` before a forward on one device.
    """

    def __init__(self, snapshot_every: int = DEFAULT_SNAPSHOT_EVERY, watch: Optional[LossWatch] = None) -> None:
        self.watch = watch if watch is not None else LossWatch()
        # the mean gradient norm of the backwards: near a minimum the loss grows like its square, hence the root;
        # gradients often grow during healthy training, so only the loss is held to where the run started
        self.gradients = LossWatch(math.sqrt(self.watch.factor), reclaim=0.0, relapse=False)  # `rising` alone
        self._gradient_totals = (0.0, 0)
        self._gradient_norm: Optional[float] = None  # the mean norm of the latest backwards (repeated until new ones)
        self.reader = LossReader()
        self.snapshot_every = snapshot_every
        self.good: Optional[GoodState] = None
        self._since_snapshot = 0
        self._first_step_seen = False
        self.trips = 0

    def restart(self) -> None:
        """The weights changed from outside the engine (pruning, a replaced layer, new storage): the history and the
        good state no longer describe them, and a loss that jumps with them (a lottery-ticket reset) is no
        blow-up. The next forward keeps a new good state."""
        self.good = None
        self.watch.rebase()
        self.gradients.rebase()
        self._gradient_norm = None
        self._since_snapshot = 0

    def observe(
        self,
        loss: Tensor,
        gradient_totals: Optional[tuple[float, int]],
        host_value: Optional[float] = None,
        step: Optional[int] = None,
    ) -> Optional[Trip]:
        """This step's loss (values on CUDA arrive a step or two late) and the gradient totals so far
        (``EngineStats.gradient_totals``; ``None`` where they are not measured, CUDA); a ``Trip`` on a blow-up.
        ``host_value``: a CPU loss's value where the caller has read it already. ``step``: the loss's global step;
        a first loss after step 0 is a resumed run's, whose start is no untrained model's (``LossWatch._relapsed``).

        A rise from the run's best needs the gradient norm up too where it is measured: a real blow-up grows the
        gradients with the loss, while a loss that merely wanders upwards (an unbounded or shifting objective) does
        not. A loss 3x where the run started needs nothing more (``Trip.needs_gradients``).
        """
        if step is not None and not self._first_step_seen:
            self._first_step_seen = True
            self.watch.relapse_armed = self.watch.relapse_armed and step == 0
        self._since_snapshot += 1
        if gradient_totals is not None:
            squares, backwards = gradient_totals
            new = backwards - self._gradient_totals[1]
            if new > 0:
                self._gradient_norm = math.sqrt(max(squares - self._gradient_totals[0], 0.0) / new)
                self._gradient_totals = gradient_totals
            if self._gradient_norm is not None:  # one observation per step, like the loss's
                self.gradients.observe(self._gradient_norm)
        for value in self.reader.push(loss, host_value):
            trip = self.watch.observe(value)
            if trip is not None and (not trip.needs_gradients or gradient_totals is None or self.gradients.rising):
                return trip
        return None

    def exchanging_replicas(self) -> None:
        """Several devices: the relapse rule stays off. Merging the updates of a rank that lags behind raises a
        fast rank's loss by design (a straggler held at its first batch pulled rank 0's loss back up), and a trip
        there makes the fast rank wait for the slow one at the next consistent point."""
        self.watch.relapse_armed = False

    def due_for_snapshot(self) -> bool:
        return self.good is None or (self._since_snapshot >= self.snapshot_every and self.watch.healthy)

    def keep(self, module: nn.Module, optimizer: Optimizer, step: int) -> None:
        """The state now is good: keep it (drained by the caller). The previous one goes first, so that only one
        copy exists at any time."""
        self.good = None
        self.good = GoodState.take(module, optimizer, step)
        self._since_snapshot = 0

    def recover(
        self, trip: Trip, module: nn.Module, optimizer: Optimizer, step: int, in_flight: int
    ) -> Optional[int]:
        """Restore the last good state after ``trip`` and return the new ``max_in_flight`` (half, at least 1).

        ``None`` when nothing is left to reduce: with one loss in flight the updates are exactly plain Lightning's,
        so the blow-up is the settings' own (plain Lightning diverges too). The run then goes on as plain Lightning
        would, with a warning that says so, and the guard stops watching.
        """
        self.trips += 1
        if in_flight <= 1 or self.good is None:
            warnings.warn(
                f"PD-ASGD's divergence guard: at step {step} {trip.reason} ({trip.baseline} {trip.best:.4g}, now"
                f" {trip.now:.4g}) with one loss in flight, i.e. with exactly plain Lightning's updates: plain"
                " Lightning diverges here too. Training goes on unguarded, as it would without PD-ASGD. Lower the"
                " learning rate (or the schedule's peak), add warm-up, or clip gradients"
                " (`Trainer(gradient_clip_val=...)`).",
                RuntimeWarning,
                stacklevel=2,
            )
            return None
        self.good.restore(module, optimizer)
        self.watch.reset()
        self.gradients.reset()
        self._gradient_norm = None
        self._since_snapshot = 0
        slower = max(1, in_flight // 2)
        message = (
            f"PD-ASGD's divergence guard: at step {step} {trip.reason} ({trip.baseline} {trip.best:.4g}, now"
            f" {trip.now:.4g}). Restored the weights and optimizer state of step {self.good.step} and continued with"
            f" max_in_flight={slower} (was {in_flight}){' -- exactly plain updates' if slower == 1 else ''}. To avoid"
            " it: lower the learning rate, or set `PDASGDStrategy(max_in_flight=1)`; `divergence_guard=False` turns"
            " the guard off."
        )
        if self.trips == 1:
            warnings.warn(message, RuntimeWarning, stacklevel=2)
        else:
            log.warning(message)
        return slower
