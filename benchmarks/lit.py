"""The LightningModule and DataModule every configuration trains: ordinary Lightning code, nothing PD-ASGD specific.

``training_step`` logs nothing: a ``self.log`` per step costs about as much as a whole digits-MLP step, and would
blur the comparison of strategies into a comparison of logging paths.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torchmetrics
from lightning.pytorch import LightningDataModule, LightningModule
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.workloads import Workload


class Classifier(LightningModule):
    """Cross-entropy classification with SGD + momentum; validation accuracy synced across ranks by torchmetrics."""

    def __init__(self, workload: Workload) -> None:
        super().__init__()
        self.workload = workload
        self.net = workload.build_model()
        self.val_acc = torchmetrics.Accuracy(task="multiclass", num_classes=10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.val_acc(self(x), y)
        self.log("val_acc", self.val_acc, on_step=False, on_epoch=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        w = self.workload
        return torch.optim.SGD(self.parameters(), lr=w.lr, momentum=w.momentum, weight_decay=w.weight_decay)


class Data(LightningDataModule):
    """In-memory tensors, ``num_workers=0`` (no loader processes to compete for the cores), seeded shuffling."""

    def __init__(self, train: TensorDataset, val: TensorDataset, batch_size: int, seed: int) -> None:
        super().__init__()
        self.train_set, self.val_set = train, val
        self.batch_size, self.seed = batch_size, seed

    def train_dataloader(self) -> DataLoader:
        generator: Optional[torch.Generator] = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, generator=generator)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=256)
