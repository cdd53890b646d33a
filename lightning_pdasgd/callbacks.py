"""The callback the strategy inserts to reach a consistent point at every epoch end."""

from __future__ import annotations

from typing import Any

from lightning_pdasgd import _flavor

from .integration._lightning import Callback
from .integration._lightning import pytorch as pl


class EngineDrain(Callback):
    """Brings the engine to a consistent point at the end of every training epoch, before other epoch-end hooks.

    Also reaches the validation consistent point before other callbacks' ``on_validation_start``, and tells the
    step accounting (several devices, ``step_accounting.py``) where each epoch starts.

    Lightning has no strategy hook at epoch end; the strategy inserts this callback first in ``trainer.callbacks``
    so that callbacks and the module's ``on_train_epoch_end`` see every update of the epoch applied (and, with
    several devices, identical replicas). It holds no state, so checkpoints keep the keys of a plain run.
    """

    @classmethod
    def attach(cls, trainer: pl.Trainer) -> None:
        """Insert one instance first in ``trainer.callbacks`` (before any callback's epoch-end hook)."""
        if not any(isinstance(callback, cls) for callback in trainer.callbacks):
            trainer.callbacks.insert(0, cls())

    @classmethod
    def detach(cls, trainer: pl.Trainer) -> None:
        """Remove it again when the fit ends: the Trainer's callback list is the user's once more (Lightning's
        tuner and tests compare it before and after)."""
        trainer.callbacks[:] = [callback for callback in trainer.callbacks if not isinstance(callback, cls)]

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        accounting = getattr(trainer.strategy, "step_accounting", None)
        if accounting is not None:  # several devices: the epoch's step schedule counts from its exact start
            accounting.on_epoch_start()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        if idx == 0 and trainer.world_size > 1:
            show_estimated_epoch_length(trainer)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # the strategy's own hook comes after every callback's: reach the point here so that the other callbacks'
        # `on_validation_start` already see identical replicas and the settled step count
        reach = getattr(trainer.strategy, "reach_consistent_point", None)
        if reach is not None and trainer.state.fn == "fit":
            reach("validation")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        """With ``max_in_flight=1``, every batch-end hook sees the batch's update applied, as in a plain step.

        (The next forward would wait for that backward anyway: draining here costs only the overlap of the
        backward with fetching the next batch.) Callbacks that read the weights at batch end, such as
        ``EMAWeightAveraging``, then average exactly what a plain run averages.
        """
        if getattr(trainer.strategy, "max_in_flight", None) == 1:
            trainer.strategy.drain()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        reach = getattr(trainer.strategy, "reach_consistent_point", None)
        if reach is not None:
            reach("epoch_end")

    def state_dict(self) -> dict[str, Any]:
        return {}


def show_estimated_epoch_length(trainer: pl.Trainer) -> None:
    """Give the progress bar this rank's expected share of a dynamically shared epoch as its total.

    The claiming sampler has no length (see ``claiming.py``), so Lightning's bars start without a total; the
    estimate is the epoch's batches (after ``limit_train_batches``) over the ranks (a fast rank may go past it).
    """
    RichProgressBar = _flavor.every_imported("callbacks.RichProgressBar")  # the Trainer may be either package's
    TQDMProgressBar = _flavor.every_imported("callbacks.TQDMProgressBar")

    sampler = getattr(trainer.train_dataloader, "batch_sampler", None)
    estimate = getattr(sampler, "estimated_batches", None)
    bar = trainer.progress_bar_callback
    if estimate is None or bar is None or bar.is_disabled:
        return
    if isinstance(bar, TQDMProgressBar):
        bar.train_progress_bar.total = estimate
        bar.train_progress_bar.refresh()
    elif isinstance(bar, RichProgressBar) and bar.progress is not None and bar.train_progress_bar_id is not None:
        bar.progress.update(bar.train_progress_bar_id, total=estimate)
