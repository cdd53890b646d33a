"""LightningModules and data used across the tests: ordinary Lightning code, nothing PD-ASGD specific."""

from __future__ import annotations

import time
from typing import Any, Callable

import torch
from lightning.pytorch import LightningDataModule, LightningModule
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def digits_tensors(seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """scikit-learn's bundled 8x8 digits (1,797 real images, offline), split 80/20 with a fixed permutation."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    split = int(0.8 * len(x))
    return TensorDataset(x[:split], y[:split]), TensorDataset(x[split:], y[split:])


class DigitsData(LightningDataModule):
    def __init__(self, batch_size: int = 32, shuffle: bool = True) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.train_set, self.val_set = digits_tensors()

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=self.shuffle)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=256)


OptimizerFactory = Callable[[Any], torch.optim.Optimizer]


class DelayedBackward(torch.autograd.Function):
    """Identity whose backward sleeps (GIL released) before passing the gradient on: a long backward on demand."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, seconds: float) -> torch.Tensor:
        ctx.seconds = seconds
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        time.sleep(ctx.seconds)
        return grad, None


class DigitsClassifier(LightningModule):
    """An MLP with BatchNorm on the digits; optimizer and scheduler are chosen by the test."""

    def __init__(
        self,
        optimizer: OptimizerFactory | None = None,
        scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
        scheduler_interval: str = "step",
        hidden: int = 64,
        sync_dist: bool = False,
    ) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(64, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, 10),
        )
        self.optimizer_factory = optimizer or (lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9))
        self.scheduler_factory = scheduler
        self.scheduler_interval = scheduler_interval
        self.val_accuracy: list[float] = []
        self.sync_dist = sync_dist

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_step=True, on_epoch=True, sync_dist=self.sync_dist)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        accuracy = (self(x).argmax(dim=1) == y).float().mean()
        self.log("val_acc", accuracy, prog_bar=True, sync_dist=self.sync_dist)

    def on_validation_epoch_end(self) -> None:
        value = self.trainer.callback_metrics.get("val_acc")
        if value is not None and not self.trainer.sanity_checking:
            self.val_accuracy.append(float(value))

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = {"scheduler": self.scheduler_factory(optimizer), "interval": self.scheduler_interval}
        return {"optimizer": optimizer, "lr_scheduler": scheduler}
