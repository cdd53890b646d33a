"""One replica of a fault-tolerant Lightning fit, as its own process (``tests/test_fault_tolerance.py``).

``python -m tests.ft_lightning_replica OUT SLOT EPOCHS [--die-after N] [--wait-for-replicas K --wait-epochs 0,1]``

The digits MLP with BatchNorm (``tests/models.py``) on ``Trainer(strategy=PDASGDStrategy(fault_tolerant=True))``:
``--die-after N`` kills this process (SIGKILL) after its N-th training batch (``--freeze-after N``: SIGSTOP, a hung
machine); ``--wait-for-replicas`` holds those
epochs' starts until K replicas are in the quorum. Writes the final weights and what the fit saw to OUT.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from lightning_pdasgd import PDASGDStrategy
from tests.models import DigitsClassifier, DigitsData


class _Scenario(Callback):
    def __init__(self, die_after: int, wait_for: int, wait_epochs: set[int], freeze_after: int = 0) -> None:
        self.die_after = die_after
        self.freeze_after = freeze_after
        self.wait_for = wait_for
        self.wait_epochs = wait_epochs
        self.trained = 0
        self.first_epoch: int | None = None
        self.first_step: int | None = None
        self.started = time.monotonic()
        self.first_batch_after_s: float | None = None  # from `trainer.fit` to this replica's first batch
        self.exchange: dict[str, float] = {}

    def on_train_epoch_start(self, trainer: Trainer, pl_module: Any) -> None:
        if self.first_epoch is None:
            self.first_epoch, self.first_step = trainer.current_epoch, trainer.global_step
        if trainer.current_epoch in self.wait_epochs:
            trainer.strategy._fit.fault_tolerant.link.wait_for_replicas(self.wait_for)

    def on_train_batch_start(self, trainer: Trainer, *args: Any) -> None:
        if self.first_batch_after_s is None:
            self.first_batch_after_s = time.monotonic() - self.started

    def on_train_end(self, trainer: Trainer, pl_module: Any) -> None:
        exchange = trainer.strategy._fit.session.exchange  # still running: it stops in the strategy's hook after
        self.exchange = {
            "longest_round_s": exchange.longest_round_s,
            "rounds": exchange.rounds,
            "failed_rounds": exchange.failed_rounds,
        }

    def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
        self.trained += 1
        if self.trained == self.die_after:
            os.kill(os.getpid(), signal.SIGKILL)
        if self.trained == self.freeze_after:  # a hung machine: its sockets stay open, it answers nothing
            os.kill(os.getpid(), signal.SIGSTOP)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("slot", type=int)
    parser.add_argument("epochs", type=int)
    parser.add_argument("--die-after", type=int, default=0)
    parser.add_argument("--wait-for-replicas", type=int, default=0)
    parser.add_argument("--wait-epochs", default="")
    parser.add_argument("--freeze-after", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out)
    torch.manual_seed(args.slot)
    epochs = {int(e) for e in args.wait_epochs.split(",") if e}
    scenario = _Scenario(args.die_after, args.wait_for_replicas, epochs, args.freeze_after)
    model = DigitsClassifier(optimizer=lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.5))
    trainer = Trainer(
        strategy=PDASGDStrategy(fault_tolerant=True, replica=args.slot, ft_timeout=2.0, wait_timeout=120),
        accelerator="cpu",
        devices=1,
        max_epochs=args.epochs,
        callbacks=[scenario, ModelCheckpoint(dirpath=out / "checkpoints", save_last=True, save_top_k=-1)],
        logger=CSVLogger(out / "logs", name="", version=f"replica{args.slot}"),
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    scenario.started = time.monotonic()
    trainer.fit(model, datamodule=DigitsData())
    torch.save(model.state_dict(), out / f"replica{args.slot}.pt")
    record = {
        "trained": scenario.trained,
        "first_epoch": scenario.first_epoch,
        "first_step": scenario.first_step,
        "global_step": trainer.global_step,
        "current_epoch": trainer.current_epoch,
        "val_accuracy": model.val_accuracy,
        "guard_trips": trainer.strategy.stats.guard_trips,
        "first_batch_after_s": scenario.first_batch_after_s,
        "fit_s": time.monotonic() - scenario.started,
        **scenario.exchange,
    }
    (out / f"replica{args.slot}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
