"""How the strategy calls into the engine from Lightning's hooks: errors that Lightning would misread are reworded,
and the engine's metrics are logged only where Lightning can log."""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType
from typing import Any, Optional


def logs_metrics(trainer: Any) -> bool:
    """``Trainer(barebones=True)`` makes ``self.log`` raise and ``log_every_n_steps=0`` writes no logs (it is the
    divisor of the metrics' schedule): with either, the ``pdasgd/*`` metrics are not logged."""
    return not getattr(trainer, "barebones", False) and trainer.log_every_n_steps > 0


class EngineCall:
    """Turns a ``StopIteration`` raised by PD-ASGD's own code into a ``RuntimeError`` that says where it came from.

    Lightning's loops take a ``StopIteration`` from any hook for the end of the data: the epoch (or the whole fit)
    ends silently there, and with ``max_steps`` the next epoch hits it again, forever. A patched
    ``time.perf_counter`` whose ``side_effect`` list ran out (Lightning's ``ThroughputMonitor`` tests) raised one
    in the engine's timing. Those in ``passed_through`` (the user's step exhausting ``dataloader_iter``) stay.
    """

    def __init__(self, where: str, passed_through: Sequence[BaseException] = ()) -> None:
        self._where = where
        self._passed_through = passed_through

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: Optional[type[BaseException]], error: Optional[BaseException], trace: Optional[TracebackType]
    ) -> bool:
        if not isinstance(error, StopIteration) or any(error is allowed for allowed in self._passed_through):
            return False
        raise RuntimeError(
            f"PD-ASGD: StopIteration was raised inside the engine during {self._where}, not by the training data;"
            " Lightning would have ended the epoch there without a step. An iterator or mock with a finite"
            " `side_effect` ran out, e.g. `mock.patch('time.perf_counter', side_effect=[...])`, whose values the"
            " engine's timing reads too: give the mock enough values, or patch the module that should see them"
            " (e.g. `lightning.pytorch.callbacks.throughput_monitor.time`)."
        ) from error
