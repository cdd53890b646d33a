"""The engine's hooks on Lightning's path of a step: on for the engine's steps, off while one device runs Lightning's
own step.

Two hooks sit on the steps of a fit that may use the engine: the ``EngineDrain`` callback (Lightning calls each
callback's batch hooks, so even its empty ones cost a dispatch) and the routing of the precision plugin's backward
(``engine_backward.py``). A step that one device runs as Lightning's own -- the synchronous warm-up, the autotuner's
plain trial and choice, the divergence guard's switch -- needs no callback, since nothing is in flight between such
steps, and the routing only where the warm-up or the guard watches the losses. Timed inside the loop, a warm-up step
carried about 90 us of the strategy on the 0.8 ms steps of ``benchmarks.engine_overhead``'s small MLP (about 35 us
of it the callback), although each piece costs well under a microsecond when timed alone: between torch's kernels
the Python runs on cold caches. ``follow`` switches the hooks before every step that is not yet known to be
Lightning's own for good; the exact mode never installs them.
"""

from __future__ import annotations

from typing import Any, Optional

from lightning_pdasgd.engine.session import FitSession

from ..callbacks import EngineDrain
from .engine_backward import EngineBackward


class EngineHooks:
    """Installs and removes one strategy's hooks: the ``EngineDrain`` callback and the backward routing."""

    def __init__(self, strategy: Any) -> None:
        self.backward_route = EngineBackward(strategy)  # a step's loss to the engine or to Lightning's backward
        self._wanted = False  # installed at setup: this fit may use the engine
        self._callback_on = self._route_on = False
        self.lightning_step_alone = False  # this step, one device runs Lightning's own step (``follow`` says)
        self._aside_for: Optional[FitSession] = None  # the session that runs Lightning's own step for good

    @property
    def aside_for(self) -> Optional[FitSession]:
        """The session that runs Lightning's own step for good, once ``follow`` has seen it do so."""
        return self._aside_for

    def install(self, trainer: Any) -> None:
        """At setup, for a fit that may use the engine."""
        self._wanted = True
        self._aside_for = None
        self._switch(trainer, callback=True, route=True)

    def remove(self, module: Optional[Any]) -> None:
        """At teardown (of ``module``'s fit): the Trainer's callbacks and its precision plugin are the user's again."""
        self._wanted = False
        self._aside_for = None
        self.lightning_step_alone = False
        self._switch(getattr(module, "_trainer", None), callback=False, route=False)

    def follow(self, session: FitSession, trainer: Any) -> None:
        """Before a training step: while one device runs Lightning's own step (a warm-up, the autotuner's plain
        trial or choice, the guard's switch) nothing is in flight between steps, so the drain callback is off, and
        the routing too unless the warm-up or the guard watches the losses; both are on for the engine's steps."""
        alone = session.lightning_step_alone
        self.lightning_step_alone = alone
        if alone:
            session.end_step()  # an engine forward whose step never came (SWA's BatchNorm epoch) frees its slot
            session.updater.reads.close()  # (idempotent) no engine pre-hook on the modules' call path
            if session.lightning_steps_only:
                self._aside_for = session
        if self._wanted:
            self._switch(trainer, callback=not alone, route=not alone or session.watches_lightning_losses)

    def _switch(self, trainer: Optional[Any], callback: bool, route: bool) -> None:
        if callback != self._callback_on and trainer is not None:
            (EngineDrain.attach if callback else EngineDrain.detach)(trainer)
            self._callback_on = callback
        if route != self._route_on:
            self.backward_route.install() if route else self.backward_route.remove()
            self._route_on = route

    def __getstate__(self) -> dict[str, Any]:
        """A copy made while a fit runs (a pickled Trainer) holds no session: its threads and locks stay here."""
        return {**self.__dict__, "_aside_for": None, "lightning_step_alone": False}
