"""A rank slowed on purpose: the straggler that tests and benchmarks compare strategies under."""

from __future__ import annotations

import time
from typing import Any

from .integration._lightning import Callback
from .integration._lightning import pytorch as pl


class Straggler(Callback):
    """Slows one rank on purpose, to test and benchmark behaviour with a slow device.

    After every training batch on global rank ``rank`` it sleeps either a fixed ``delay_s`` seconds, or
    ``factor`` times that rank's own measured step period (time between two batch starts, minus the sleeps), so
    ``factor=1.0`` runs the rank at half speed and ``factor=3.0`` at quarter speed. Works with any strategy
    (``"ddp"`` too), so side-by-side comparisons use the same slowdown.

    Example::

        Trainer(strategy="pdasgd", devices=2, callbacks=[Straggler(rank=1, factor=1.0)])
    """

    def __init__(self, rank: int = 1, delay_s: float | None = None, factor: float | None = None) -> None:
        if (delay_s is None) == (factor is None):
            raise ValueError("Straggler: give exactly one of `delay_s` (seconds per step) or `factor` (x step time).")
        if (delay_s is not None and delay_s < 0) or (factor is not None and factor < 0):
            raise ValueError("Straggler: `delay_s` and `factor` must be >= 0.")
        self.rank = rank
        self.delay_s = delay_s
        self.factor = factor
        self._last_start: float | None = None
        self._slept = 0.0
        self._period: float | None = None
        self.total_sleep_s = 0.0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        now = time.perf_counter()
        if self._last_start is not None:
            period = max(now - self._last_start - self._slept, 0.0)
            self._period = period if self._period is None else 0.8 * self._period + 0.2 * period
        self._last_start, self._slept = now, 0.0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if trainer.global_rank != self.rank:
            return
        seconds = self.delay_s if self.delay_s is not None else (self.factor or 0.0) * (self._period or 0.0)
        if seconds > 0:
            time.sleep(seconds)
            self._slept += seconds
            self.total_sleep_s += seconds

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_start, self._slept = None, 0.0
