"""The ``pdasgd/*`` metrics of a fit, logged through ``self.log`` on Lightning's schedule.

Lightning keeps every ``on_step`` value logged in an epoch and reads them all again at each later batch end, so
the engine's handful of keys, logged every ``log_every_n_steps``, cost every step about 7 us each (half the
overhead of ``max_in_flight=1`` on a 1 ms step). Once Lightning has taken them (the logging step's batch end), the
next step retires them: the loggers, ``callback_metrics`` and the progress bar keep their last values.
"""

from __future__ import annotations

from typing import Any

from lightning_pdasgd.engine.metrics import log_window
from lightning_pdasgd.engine.session import FitSession

from . import _lightning_internals
from .engine_calls import logs_metrics


class StepMetrics:
    """Logs a session's window of statistics after a step, and retires the logged values at the next step."""

    def __init__(self) -> None:
        self._live: frozenset[str] = frozenset()  # logged at the previous step, still re-read by Lightning

    def before_step(self, trainer: Any) -> None:
        """A new step: the values of the previous step's log were taken at its batch end."""
        if self._live:
            _lightning_internals.retire_step_metrics(trainer, self._live)
            self._live = frozenset()

    def after_step(self, session: FitSession, module: Any) -> None:
        """Log the window when Lightning writes (a fit that fell back to Lightning's step as warned logs none)."""
        if logs_metrics(module.trainer) and session.synchronous_reason is None:
            self._live = log_window(session, module)
