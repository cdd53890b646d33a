"""The ``pdasgd/*`` metrics of a fit, logged through ``self.log`` on Lightning's schedule.

Lightning keeps every ``on_step`` value logged in an epoch and reads them all again at each later batch end, so
the engine's handful of keys, logged every ``log_every_n_steps``, cost every step about 7 us each (half the
overhead of ``max_in_flight=1`` on a 1 ms step). Once Lightning has taken them (the logging step's batch end), the
next step retires them: the loggers, ``callback_metrics`` and the progress bar keep their last values. A key logged
before in the epoch gets its new value the way ``self.log`` gives it, without ``self.log``'s move of the key's metric
to its device each time (about 0.3 ms a key, 0.8 ms a logging step: 2-3% of a 1 ms step).
"""

from __future__ import annotations

from time import perf_counter
from typing import Any, Optional

from lightning_pdasgd.engine.metrics import batch_size_of, lightning_writes_now, window_due
from lightning_pdasgd.engine.session import FitSession

from . import _lightning_internals
from .engine_calls import logs_metrics


class StepMetrics:
    """Logs a session's window of statistics after a step, and retires the logged values at the next step."""

    def __init__(self) -> None:
        self._live: frozenset[str] = frozenset()  # logged at the previous step, still re-read by Lightning
        # Lightning's own steps on one device not yet in the session's statistics: their count, seconds and the
        # batch size of the first of them
        self._steps, self._seconds, self._first_batch = 0, 0.0, 0

    def before_step(self, trainer: Any) -> None:
        """A new step: the values of the previous step's log were taken at its batch end."""
        if self._live:
            _lightning_internals.retire_step_metrics(trainer, self._live)
            self._live = frozenset()

    def after_step(self, session: FitSession, module: Any) -> None:
        """Log the window when Lightning writes (a fit that fell back to Lightning's step as warned logs none)."""
        if self._steps:  # Lightning's own steps before these (a warm-up) belong to the window
            self.flush(session)
        if logs_metrics(module.trainer) and session.synchronous_reason is None:
            due = window_due(session, module)
            if due is not None:
                self._live = frozenset(_log(module, due[0], prog_bar=False)) | frozenset(_log(module, due[1], True))

    def lightning_step_ended(self, session: FitSession, module: Any, started: float, args: tuple[Any, ...]) -> None:
        """One device runs Lightning's own step (``lightning_step_alone``): the step after ``training_step``
        (``started`` with it; ``args``, its batch) is counted in plain numbers and handed to the session's statistics
        when Lightning writes. Between torch's kernels every line of Python here costs ten times what it costs timed
        alone (cold caches: 4 us for a walk of the batch, 4 us for the statistics' lock on the small MLP of
        ``benchmarks.engine_overhead``), so each step only adds to two numbers. Samples: every step of a window
        counts its first batch's size but the last, measured itself; exact for a DataLoader with a fixed batch size,
        whose only smaller batch ends an epoch, and so a window."""
        seconds = perf_counter() - started
        trainer = module._trainer
        self.before_step(trainer)
        if not self._steps:
            self._first_batch = batch_size_of(args)
        self._steps += 1
        self._seconds += seconds
        if lightning_writes_now(trainer):
            self.flush(session, batch_size_of(args))
            self.after_step(session, module)

    def flush(self, session: Optional[FitSession], last_batch: Optional[int] = None) -> None:
        """Hand Lightning's own steps counted so far to the session's statistics (when Lightning writes; when the
        fit ends). ``last_batch``: the size of the latest step's batch, where known."""
        steps, seconds, self._steps, self._seconds = self._steps, self._seconds, 0, 0.0
        if session is not None and steps:
            samples = self._first_batch * (steps - 1) + (self._first_batch if last_batch is None else last_batch)
            session.stats.record_forward(seconds, samples, forwards=steps)


def _log(module: Any, values: dict[str, float], prog_bar: bool) -> dict[str, float]:
    """``self.log`` for each value, by Lightning's steady-state path where the key exists already (the first log of
    a key in each epoch goes through ``self.log`` itself, which checks and registers it)."""
    logger = bool(module.trainer.loggers)
    first = _lightning_internals.update_logged_step_values(module, values, prog_bar, logger)
    if first:
        module.log_dict(first, on_step=True, on_epoch=False, batch_size=1, logger=logger, prog_bar=prog_bar)
    return values
