"""The callback that clocks a run: training time per epoch (validation excluded) and wall time at each validation.

Clocks start at ``on_train_start``, so interpreter start-up, process launch and process-group set-up are not
counted for any configuration. PD-ASGD drains its in-flight backwards before validation; that drain is training
work, so it is done here, before the validation clock starts, and counted as training time.
"""

from __future__ import annotations

import time
from typing import Any, Optional

import torch
from lightning.pytorch import Callback, LightningModule, Trainer


class RunClock(Callback):
    """Records per epoch ``{samples, steps, train_s}`` and per validation ``{epoch, wall_s, train_s, accuracy}``."""

    def __init__(self, metric: str = "val_acc") -> None:
        self.metric = metric
        self.epochs: list[dict[str, float]] = []
        self.validations: list[dict[str, float]] = []
        self.intra_op_threads: Optional[int] = None
        self._t0 = 0.0
        self._epoch_start = 0.0
        self._val_start = 0.0
        self._val_in_epoch = 0.0
        self._samples = 0
        self._steps = 0
        self._train_total = 0.0

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._t0 = time.perf_counter()

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.intra_op_threads is None:  # read here: the strategy's on_train_start runs after the callbacks'
            self.intra_op_threads = torch.get_num_threads()
        self._epoch_start = time.perf_counter()
        self._val_in_epoch, self._samples, self._steps = 0.0, 0, 0

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._samples += len(batch[0])
        self._steps += 1

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        drain = getattr(trainer.strategy, "drain", None)
        if callable(drain):
            drain()
        self._val_start = time.perf_counter()

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        now = time.perf_counter()
        train_in_epoch = (self._val_start - self._epoch_start) - self._val_in_epoch
        self._val_in_epoch += now - self._val_start
        value = trainer.callback_metrics.get(self.metric)
        self.validations.append({
            "epoch": trainer.current_epoch,
            "wall_s": now - self._t0,
            "train_s": self._train_total + train_in_epoch,
            "accuracy": float(value) if value is not None else float("nan"),
        })

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # the strategy's EngineDrain callback is first in the list: every update of the epoch is applied by now
        train_s = time.perf_counter() - self._epoch_start - self._val_in_epoch
        self._train_total += train_s
        self.epochs.append({
            "epoch": trainer.current_epoch,
            "samples": self._samples * trainer.world_size,
            "steps": self._steps,
            "train_s": train_s,
        })
