"""The engine's hooks on Lightning's path of a step: on while the engine may run, off while one device runs
Lightning's own step for good.

Two hooks sit on every step of a fit that may use the engine: the ``EngineDrain`` callback (Lightning calls each
callback's batch hooks, so even its empty ones cost a dispatch) and the routing of the precision plugin's backward
(``engine_backward.py``). A fit on one device that runs Lightning's own step for good -- the exact mode
(``max_in_flight=1``), the autotuner's choice of the plain step, the divergence guard's switch to it -- needs
neither: nothing is ever in flight between steps. What stays on such a step cost 30-40 us on the 0.8 ms steps of
``benchmarks.engine_overhead``'s small MLP (interleaved runs, per-step medians), although each piece costs well under
a microsecond when timed alone: between torch's kernels the Python runs on cold caches. So the strategy stands aside
once, and takes back its hooks when a later session of the same fit (``lr_find`` from a callback) uses the engine.
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
        self._aside_for: Optional[FitSession] = None  # the session the hooks were taken off for

    @property
    def aside_for(self) -> Optional[FitSession]:
        """The session that runs Lightning's own step for good, once the hooks have been taken off for it."""
        return self._aside_for

    def install(self, trainer: Any) -> None:
        """At setup, for a fit that may use the engine."""
        self._wanted = True
        self._aside_for = None
        EngineDrain.attach(trainer)
        self.backward_route.install()

    def remove(self, trainer: Optional[Any]) -> None:
        """At teardown: the Trainer's callbacks and its precision plugin are the user's again."""
        self._wanted = False
        self._aside_for = None
        self.backward_route.remove()
        if trainer is not None:
            EngineDrain.detach(trainer)

    def follow(self, session: FitSession, trainer: Any) -> None:
        """Before each training step of one device: off once ``session`` runs Lightning's own step for good, back
        on for a session that uses the engine. The routing stays while Lightning's losses are watched (the guard
        says once when plain updates blow up too)."""
        if session.lightning_steps_only:
            if self._aside_for is not session:
                self._aside_for = session
                session.close_reads()
                EngineDrain.detach(trainer)
                if not session.watches_lightning_losses:
                    self.backward_route.remove()
        elif self._aside_for is not None and self._wanted:
            self.install(trainer)
