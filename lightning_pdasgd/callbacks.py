"""Callbacks the strategy relies on, and ones users can add."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback


class EngineDrain(Callback):
    """Drains the engine at the end of every training epoch, before any other epoch-end hook runs.

    Lightning has no strategy hook at epoch end; the strategy inserts this callback first in ``trainer.callbacks``
    so that callbacks and the module's ``on_train_epoch_end`` see every update of the epoch applied.
    It holds no state, so checkpoints keep the keys of a plain run.
    """

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        drain = getattr(trainer.strategy, "drain", None)
        if drain is not None:
            drain()

    def state_dict(self) -> dict[str, Any]:
        return {}
