"""Callbacks the strategy relies on, and ones users can add."""

from __future__ import annotations

from typing import Any

import time

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback


class EngineDrain(Callback):
    """Brings the engine to a consistent point at the end of every training epoch, before other epoch-end hooks.

    Lightning has no strategy hook at epoch end; the strategy inserts this callback first in ``trainer.callbacks``
    so that callbacks and the module's ``on_train_epoch_end`` see every update of the epoch applied (and, with
    several devices, identical replicas). It holds no state, so checkpoints keep the keys of a plain run.
    """

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        if idx == 0 and trainer.world_size > 1:
            show_estimated_epoch_length(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        reach = getattr(trainer.strategy, "reach_consistent_point", None)
        if reach is not None:
            reach("epoch_end")

    def state_dict(self) -> dict[str, Any]:
        return {}


def show_estimated_epoch_length(trainer: pl.Trainer) -> None:
    """Give the progress bar this rank's expected share of a dynamically shared epoch as its total.

    The claiming sampler has no length (see ``claiming.py``), so Lightning's bars start without a total; the
    estimate is the epoch's batches over the ranks (a fast rank may go past it).
    """
    from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

    sampler = getattr(trainer.train_dataloader, "batch_sampler", None)
    estimate = getattr(sampler, "estimated_batches", None)
    bar = trainer.progress_bar_callback
    if estimate is None or bar is None or bar.is_disabled:
        return
    if isinstance(trainer.limit_train_batches, int):
        estimate = min(estimate, trainer.limit_train_batches)
    if isinstance(bar, TQDMProgressBar):
        bar.train_progress_bar.total = estimate
        bar.train_progress_bar.refresh()
    elif isinstance(bar, RichProgressBar) and bar.progress is not None and bar.train_progress_bar_id is not None:
        bar.progress.update(bar.train_progress_bar_id, total=estimate)


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
