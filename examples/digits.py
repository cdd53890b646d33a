"""The main job: a digit classifier trained with PD-ASGD on scikit-learn's bundled digits (offline, 2 CPU cores).

Run it (no download, about 10 s on 2 CPU cores):

    python examples/digits.py fit
    python examples/digits.py fit --config examples/configs/digits.yaml
    python examples/digits.py fit --trainer.strategy.backward_threads 3   # any strategy argument
    python examples/digits.py fit --trainer.strategy auto --trainer.logger.name plain   # plain Lightning, to compare
    lightning-pdasgd report lightning_logs/digits --baseline lightning_logs/plain      # plots, side by side

It is an ordinary LightningModule + LightningCLI script: the only PD-ASGD line is ``import lightning_pdasgd``
(which registers ``strategy="pdasgd"``) and the default ``strategy: pdasgd``. It logs with CSVLogger to
``lightning_logs/digits/version_N/`` (every 5 steps), which ``lightning-pdasgd report`` reads.

The same model through the ``lightning-pdasgd`` command (from the repository root; logs with CSVLogger for the
report)::

    lightning-pdasgd fit --config examples/configs/digits_cli.yaml
    lightning-pdasgd report lightning_logs/digits

Expected results, measured on a 2-core CPU (no GPU), 10 epochs of 45 steps: final validation accuracy 0.9806,
about 10 s wall for either command, start-up included.
"""

from __future__ import annotations

from typing import Any

import torch
import torchmetrics
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_pdasgd  # noqa: F401 - registers strategy="pdasgd"


class DigitsDataModule(LightningDataModule):
    """scikit-learn's 1,797 8x8 handwritten digits, split into train and validation with a fixed seed."""

    def __init__(self, batch_size: int = 32, val_fraction: float = 0.2, seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()

    def setup(self, stage: str) -> None:
        from sklearn.datasets import load_digits

        x, y = load_digits(return_X_y=True)
        x = torch.tensor(x, dtype=torch.float32) / 16.0
        y = torch.tensor(y, dtype=torch.long)
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.hparams.seed))
        split = int((1 - self.hparams.val_fraction) * len(x))
        train, val = order[:split], order[split:]
        self.train_set = TensorDataset(x[train], y[train])
        self.val_set = TensorDataset(x[val], y[val])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=256)


class DigitsClassifier(LightningModule):
    """A two-hidden-layer MLP with BatchNorm, SGD with momentum and a cosine LR schedule."""

    def __init__(self, hidden: int = 256, lr: float = 0.05, momentum: float = 0.9, weight_decay: float = 1e-4) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Linear(64, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
            nn.Linear(hidden, 10),
        )
        self.train_accuracy = torchmetrics.Accuracy(task="multiclass", num_classes=10)
        self.val_accuracy = torchmetrics.Accuracy(task="multiclass", num_classes=10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = nn.functional.cross_entropy(logits, y)
        self.train_accuracy(logits.detach(), y)
        self.log("train_loss", loss, prog_bar=True)
        self.log("train_acc", self.train_accuracy, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.val_accuracy(logits, y)
        self.log("val_loss", nn.functional.cross_entropy(logits, y))
        self.log("val_acc", self.val_accuracy, prog_bar=True)

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(
            self.parameters(), lr=self.hparams.lr, momentum=self.hparams.momentum,
            weight_decay=self.hparams.weight_decay,
        )
        epochs = self.trainer.max_epochs if self.trainer.max_epochs and self.trainer.max_epochs > 0 else 10
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}


def main() -> LightningCLI:
    cli = LightningCLI(
        DigitsClassifier,
        DigitsDataModule,
        seed_everything_default=0,
        # a class_path default (not the name "pdasgd") lets --trainer.strategy.<argument> set its arguments
        trainer_defaults={
            "strategy": {"class_path": "lightning_pdasgd.PDASGDStrategy"},
            "max_epochs": 10,
            "accelerator": "cpu",
            "devices": 1,
            # CSVLogger, not Lightning's default TensorBoardLogger: `lightning-pdasgd report lightning_logs/digits`
            # reads either, but a CSV file needs no extra package; 5 steps gives 9 points per 45-step epoch
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": "lightning_logs", "name": "digits"},
            },
            "log_every_n_steps": 5,
        },
        save_config_kwargs={"overwrite": True},
    )
    accuracy = cli.trainer.callback_metrics.get("val_acc")
    if cli.subcommand == "fit" and accuracy is not None and cli.trainer.is_global_zero:
        print(f"final validation accuracy: {float(accuracy):.4f}")
    return cli


if __name__ == "__main__":
    main()
