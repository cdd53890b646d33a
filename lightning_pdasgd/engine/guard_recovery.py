"""What a fit's engine does when the divergence guard trips: restore the last good state everywhere, with less
asynchrony from then on (down to Lightning's own step), and keep good states at consistent points.

A part of ``FitSession`` (``session.py``) kept in its own module: it reads and changes the session's state through
the attributes annotated below, and nothing else uses it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_pdasgd.engine.divergence_guard import DivergenceGuard, Trip
from lightning_pdasgd.engine.thread_control import EngineThreads, engine_at_one_in_flight

if TYPE_CHECKING:
    from lightning_pdasgd.engine.compensation import StalenessCompensation
    from lightning_pdasgd.engine.layerwise_updates import LayerwiseUpdater
    from lightning_pdasgd.engine.metrics import EngineStats
    from lightning_pdasgd.engine.peers import Exchange, Replicas


class GuardRecovery:
    """The guard's side of a ``FitSession``: tripping, recovering on one rank or on all, keeping good states."""

    _guard: DivergenceGuard | None
    _pending_trip: Trip | None  # several devices: this rank's trip, acted on at the next consistent point
    _module: nn.Module
    _optimizer: Optimizer
    _step: int
    _threads: EngineThreads
    _updater: LayerwiseUpdater
    _compensation: StalenessCompensation
    _stats: EngineStats
    _replicas: Replicas | None

    exchange: Exchange | None

    if TYPE_CHECKING:  # FitSession's own methods, declared for the type checker only

        def drain(self) -> None: ...
        def _stop_exchange(self, kind: str) -> None: ...
        def _connect_exchange(self) -> None: ...

    def _guard_at_consistent_point(self, met: bool, kind: str, stop: bool) -> None:
        """After the drain of a consistent point (``met``: every rank met there): keep the state as the good one, or
        with several devices recover everywhere if any rank tripped."""
        if not met:  # one device: a good state is worth keeping while the engine may still run
            guard, engine_may_run = self._guard, not self._threads.plain_steps_for_good
            if self.exchange is None and guard is not None and guard.watch.healthy and engine_may_run and not stop:
                guard.keep(self._module, self._optimizer, self._step)
            return
        if self._guard is None or stop or kind == "guard":
            return
        assert self._replicas is not None
        flags = [not self._guard.watch.healthy, self._pending_trip is not None]
        any_unhealthy, any_tripped = self._replicas.any_rank(flags)
        if any_tripped:  # every rank recovers together, or none does
            self._recover_everywhere()
        elif not any_unhealthy:  # every rank keeps the same good state, or none does
            self._guard.keep(self._module, self._optimizer, self._step)

    @property
    def watches_lightning_losses(self) -> bool:
        """The losses of Lightning's own step are watched (``watch_plain_loss``): by the warm-up, or by the guard
        at one loss in flight (during the warm-up, and after its switch to Lightning's step)."""
        guarded = self._guard is not None and self._threads.settings.max_in_flight == 1
        return guarded or self._threads.settling is not None

    def watch_plain_loss(self, loss: Tensor, step: int) -> None:
        """A loss of Lightning's own step that the guard chose (one loss in flight): still watched, so that a
        blow-up of plain updates too is said once (nothing is restored then). The warm-up's loss watch sees it."""
        self._threads.observe_warmup_loss(loss)
        if self._guard is not None and self._threads.plain_steps and self._threads.settings.max_in_flight == 1:
            trip = self._guard.observe(loss, None, step=step)
            if trip is not None:
                self._recover(trip, step)

    def _on_trip(self, trip: Trip, step: int) -> None:
        if self.exchange is not None:  # all ranks decide at the next consistent point; until then this rank
            self._pending_trip = trip  # applies no more of its own updates
        else:
            self.drain()
            self._recover(trip, step)

    def _recover_everywhere(self) -> None:
        """Several devices, some rank tripped: all meet at a "guard" point that stops the exchange, restore the
        good state of an earlier consistent point, take the same smaller ``max_in_flight``, restart the exchange."""
        self._stop_exchange("guard")
        trip = self._pending_trip or Trip("another rank's loss blew up", float("nan"), float("nan"))
        self._pending_trip = None
        self._recover(trip, self._step)
        self._connect_exchange()

    def _recover(self, trip: Trip, step: int) -> None:
        """The last good state back (drained by the caller), fewer losses in flight from now on, compensation
        starts over. A blow-up of plain updates (one in flight) restores nothing: the guard stops watching."""
        assert self._guard is not None
        in_flight = self._guard.recover(trip, self._module, self._optimizer, step, self._threads.settings.max_in_flight)
        self._stats.guard_trips += 1
        if in_flight is None:  # nothing was restored
            self._guard = None
            return
        if self._updater.windows is not None:  # gradients summed before the restore do not belong to its weights
            self._updater.windows.discard()
        self._compensation.reset()
        if in_flight == 1 and not engine_at_one_in_flight():
            self._threads.switch_to_plain_steps()  # Lightning's own step, exact by construction
        else:
            self._threads.reconfigure(min(self._threads.settings.backward_threads, in_flight), in_flight)
