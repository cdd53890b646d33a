"""The divergence guard: never a silently diverged model.

Why: one step of staleness shrinks the stable learning-rate region of momentum SGD several times (a stability
calculation: 38x for heavy-ball 0.9), so a learning rate tuned for plain Lightning can sit beyond the asynchronous
edge. Compensation keeps most runs inside; where it cannot, a run must not end at chance accuracy without a word.

The guard watches the training loss against its own recent history: a smoothed loss that climbs to ``factor``
times the best smoothed loss of the run, or to ``factor`` times the run's first losses (from the first steps on, when
there is no best yet), is a blow-up, and so is a loss whose recent median undid half the run's progress and stays
there (``LossWatch._relapsed``; in a fit that starts at step 0, on one device); each rule's move must also stand
out of the loss's own step-to-step noise (a fine-tune from trained weights starts from a noisy low loss). The rules
are ``loss_watch.py``'s. A NaN/Inf loss or gradient is the
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
import warnings
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_pdasgd.engine.loss_watch import LossWatch, Trip

log = logging.getLogger(__name__)


DEFAULT_SNAPSHOT_EVERY = 200  # one device: steps between snapshots of the last good state


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
        self.gradients = LossWatch(math.sqrt(self.watch.factor), reclaim=0.0, relapse=False, noise_multiple=0.0)
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
