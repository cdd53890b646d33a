"""The ``pdasgd/*`` metrics of a fit, logged through ``self.log`` on Lightning's schedule.

Lightning keeps every ``on_step`` value logged in an epoch and reads them all again at each later batch end, so
the engine's handful of keys, logged every ``log_every_n_steps``, cost every step about 7 us each (half the
overhead of ``max_in_flight=1`` on a 1 ms step). Once Lightning has taken them (the logging step's batch end), the
next step retires them: the loggers, ``callback_metrics`` and the progress bar keep their last values. A key logged
before in the epoch gets its new value the way ``self.log`` gives it, without ``self.log``'s move of the key's metric
to its device each time (about 0.3 ms a key, 0.8 ms a logging step: 2-3% of a 1 ms step).
"""

from __future__ import annotations

from typing import Any

from lightning_pdasgd.engine.metrics import window_due
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
            due = window_due(session, module)
            if due is not None:
                self._live = frozenset(_log(module, due[0], prog_bar=False)) | frozenset(_log(module, due[1], True))


def _log(module: Any, values: dict[str, float], prog_bar: bool) -> dict[str, float]:
    """``self.log`` for each value, by Lightning's steady-state path where the key exists already (the first log of
    a key in each epoch goes through ``self.log`` itself, which checks and registers it)."""
    logger = bool(module.trainer.loggers)
    first = _lightning_internals.update_logged_step_values(module, values, prog_bar, logger)
    if first:
        module.log_dict(first, on_step=True, on_epoch=False, batch_size=1, logger=logger, prog_bar=prog_bar)
    return values
