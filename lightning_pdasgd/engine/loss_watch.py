"""When a training loss is a blow-up: the divergence guard's rules (``divergence_guard.py`` acts on them).

Each rule compares the loss with its own history (its best, where the run started, its progress) and with the
loss's own step-to-step noise, so that it needs no scale of the objective. Separate from the guard, which keeps and
restores states, so that the rules can be replayed on recorded loss curves alone.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass
from typing import Optional

DEFAULT_FACTOR = 3.0  # a smoothed loss this many times the best one is a blow-up
DEFAULT_SMOOTHING_STEPS = 20  # the span of the loss's exponential moving average
DEFAULT_WARMUP_STEPS = 20  # losses observed before a rise can count (the first ones move fast)
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
NOISE_MULTIPLE = 3.0  # every rule's rise (or fall) must also be this many times the loss's step-to-step noise
NOISE_WINDOW = 100  # ... for the relapse rule's fall (medians), also measured over this many latest steps
RELAPSE_NOISE_MULTIPLE = 4.0 / 3.0  # ... and that fall, between the extremes of many medians, 4x rather than 3x


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
        noise_multiple: float = NOISE_MULTIPLE,
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
        self._noise_multiple = noise_multiple
        self._log_steps: list[float] = []  # |log(loss / previous loss)| over the first warm-up
        self._latest_log_steps: deque[float] = deque(maxlen=NOISE_WINDOW)  # ... over the latest steps
        self._calibrating = True  # in the first warm-up: ``_log_steps`` grows
        self._previous: Optional[float] = None
        self._lowest_median = math.inf  # the lowest median of ``EARLY_RECENT_STEPS`` losses, warm-up included
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
        self._log_steps = []
        self._latest_log_steps.clear()
        self._calibrating = True
        self._lowest_median = math.inf
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
        self._previous = None  # a restore's jump back is no step of the loss's noise

    @property
    def noise(self) -> float:
        """How far the loss moves from one step to the next where the run started, in log terms: the mean of
        ``|log(loss / previous loss)|`` over the first warm-up. Small for a run that starts untrained (its loss
        falls smoothly from a high level); large for one that starts trained, e.g. a fine-tune of a model already
        fitted to the task, whose batch losses spread over two orders of magnitude (0.0001-0.13 measured)."""
        steps = self._log_steps
        return sum(steps) / len(steps) if len(steps) >= EARLY_BASE_STEPS else 0.0

    @property
    def noise_so_far(self) -> float:
        """The relapse rule's noise: the larger of the median step over the first warm-up and over the latest
        ``NOISE_WINDOW`` steps. Medians, so that neither a fast fall (an MLP at lr 0.2: a mean of 0.32 against a
        median of 0.18, and its relapse was missed by the mean) nor the relapse's own jumps count as noise; the
        latest steps too, since a fine-tune's first warm-up can be calm by chance (0.5 measured, 1.3 over its run)."""
        first, latest = self._log_steps, self._latest_log_steps
        return max(statistics.median(first) if first else 0.0, statistics.median(latest) if latest else 0.0)

    def _beyond_noise(self, high: float, low: float, noise: float) -> bool:
        """``high`` is ``noise_multiple`` times ``noise`` above ``low`` (in log terms). A fine-tune's batch losses,
        from 0.001 to 0.05 and back, moved its moving average 3x above its best and above 3x its first losses, and
        its median of 5 5x below where it started and back, with nothing diverging: each rule's move must stand out
        of that noise too. A run that starts untrained falls smoothly, and its noise is small against its rules'
        moves (0.05-0.5 on the curves measured; a fine-tune's 0.8-2.7)."""
        if not self._noise_multiple or not self._all_positive:
            return True
        return 0 < low <= high and math.log(high / low) >= self._noise_multiple * noise

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
        rose = self.smoothed > self.factor * self.best
        return rose and undone and self._beyond_noise(self.smoothed, self.best, self.noise)

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
        recent = statistics.median(self._recent)
        rose = self.smoothed > level and recent > level
        return rose and self._beyond_noise(min(self.smoothed, recent), self.first, self.noise)

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
            # a fall within the noise is no progress to undo (the lowest median since the start, warm-up included)
            and self._beyond_noise(start, self._lowest_median, RELAPSE_NOISE_MULTIPLE * self.noise_so_far)
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
        if self._noise_multiple and self._previous is not None and self._previous > 0 and loss > 0:
            step = abs(math.log(loss / self._previous))
            if self.relapse_armed:  # only the relapse rule reads the latest steps (it is never armed again)
                self._latest_log_steps.append(step)
            if self._calibrating:
                self._log_steps.append(step)
        self._previous = loss
        self._calibrating = self._calibrating and self.seen < self._warmup
        if self._firsts_seen < EARLY_BASE_STEPS:
            self._firsts_seen += 1
            self.first = max(self.first, loss)
        if self.above_first:
            return Trip(f"the smoothed loss rose above {self.factor:g}x the run's first losses", self.first,
                        self.smoothed, "first loss", needs_gradients=False)
        full = self.relapse_armed and len(self._recent) == EARLY_RECENT_STEPS
        recent_median = sorted(self._recent)[EARLY_RECENT_STEPS // 2] if full else None
        if recent_median is not None:
            self._lowest_median = min(self._lowest_median, recent_median)
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
