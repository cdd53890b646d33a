"""How long ``synchronous_warmup="auto"`` lasts: a tenth of the run, then on while the training loss has not yet
fallen to half of where the run started, up to a third of the run.

Why (``docs/convergence.md``): at a learning rate near plain Lightning's own edge of stability the loss of the first
phase is chaotic. On the paired grid's cnn32 (lr 0.02, momentum 0.9) plain Lightning's loss jumps from 1.5 back to
2.2 around step 35 of 192 and is below 0.6 ten steps later; the same spike a few steps after a fixed warm-up of a
tenth left one seed of PD-ASGD near chance for the rest of the first epoch (validation 0.39 against plain's 0.98).
One step of staleness shrinks heavy-ball momentum's stable learning rates 38x, and it is in that first phase that a
run sits closest to the edge. A warm-up that lasts until the loss has halved covers it where a fixed length either
ends inside it or costs every run a long synchronous start.
"""

from __future__ import annotations

import math
from typing import Optional

from torch import Tensor

from lightning_pdasgd.engine.divergence_guard import LossReader

SETTLED_SHARE = 0.5  # the loss has left the first phase once its moving average is at most this share of the start
FIRST_LOSSES = 5  # where the run started: the mean of this many first losses
SMOOTHING_STEPS = 10  # the span of the loss's exponential moving average


class LossSettling:
    """After the fixed part of the warm-up, says step by step whether to stay synchronous: while the loss's moving
    average is above ``SETTLED_SHARE`` of its first values, for at most ``extra_steps`` more steps.

    A loss that was ever <= 0 (an objective without a scale) ends the extension: there is nothing to measure
    "halved" against. A step whose ``training_step`` returned ``None`` has no loss (Lightning skips its backward)
    and is passed over.
    """

    def __init__(self, extra_steps: int) -> None:
        self.extra_left = extra_steps
        self._reader = LossReader()
        self._firsts: list[float] = []
        self._smoothed: Optional[float] = None
        self._measurable = True

    def observe(self, loss: Tensor) -> None:
        """A warm-up step's loss (on CUDA its value is read a step or two later)."""
        for value in self._reader.push(loss):
            if not (value > 0 and math.isfinite(value)):
                self._measurable = False
            elif len(self._firsts) < FIRST_LOSSES:
                self._firsts.append(value)
            weight = 2.0 / (SMOOTHING_STEPS + 1)
            self._smoothed = value if self._smoothed is None else self._smoothed + weight * (value - self._smoothed)

    @property
    def settled(self) -> bool:
        if not self._measurable:
            return True
        if len(self._firsts) < FIRST_LOSSES or self._smoothed is None:
            return False
        return self._smoothed <= SETTLED_SHARE * (sum(self._firsts) / len(self._firsts))

    def extend(self) -> bool:
        """Before a step after the fixed warm-up: ``True`` to run it synchronously as well (uses one extra step)."""
        if self.extra_left <= 0 or self.settled:
            return False
        self.extra_left -= 1
        return True
