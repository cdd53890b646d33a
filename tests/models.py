"""LightningModules and data used across the tests: ordinary Lightning code, nothing PD-ASGD specific."""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

import torch
from lightning.pytorch import LightningDataModule, LightningModule
from torch import nn
from torch.utils.checkpoint import checkpoint
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
    """The digits of :func:`digits_tensors` as a DataModule: shuffled training batches, validation in batches of 256."""

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

LR = 0.125  # LinearLoss's SGD learning rate: a power of two, so every update is exact in float64


class LinearLoss(LightningModule):
    """loss = sum_l <w_l, x * c_l>: every gradient is known in advance and does not depend on the weights.

    Three layers (one tied into two places) so that concurrent backwards interleave their per-layer updates.
    """

    def __init__(self, width: int = 512) -> None:
        super().__init__()
        self.first = nn.Parameter(torch.zeros(width, dtype=torch.float64))
        self.second = nn.Parameter(torch.zeros(width, dtype=torch.float64))
        self.shared = nn.Linear(width, 1, bias=False, dtype=torch.float64)
        self.tied = nn.Module()
        self.tied.weight = self.shared.weight  # the same parameter under two names
        nn.init.zeros_(self.shared.weight)
        self.frozen = nn.Parameter(torch.ones(width, dtype=torch.float64), requires_grad=False)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (x,) = batch
        x = x.sum(dim=0)
        loss = (self.first * x).sum() + (self.second * (2 * x)).sum() + self.shared(x * self.frozen).sum()
        return loss + (self.tied.weight.squeeze(0) * x).sum()  # the tied use: its gradient adds to `shared`

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=LR)


def integer_batches(count: int, width: int, batch_size: int = 4) -> DataLoader:
    """``count`` fixed-seed batches of small integers (float64, so LinearLoss's sums are exact), in order."""
    data = torch.randint(-8, 9, (count * batch_size, width), generator=torch.Generator().manual_seed(7))
    return DataLoader(TensorDataset(data.double()), batch_size=batch_size)


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


def digits_resnet18() -> nn.Module:
    """torchvision's ResNet-18 (BatchNorm) for 8x8 one-channel digits upsampled to 16x16."""
    from torchvision.models import resnet18

    model = resnet18(num_classes=10)
    model.conv1 = nn.Conv2d(1, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Upsample(size=(16, 16), mode="bilinear"), model)


class DigitsResNet(DigitsClassifier):
    """The digits classifier on ResNet-18 at plain Lightning's hyperparameters (SGD, Nesterov momentum 0.9)."""

    def __init__(self) -> None:
        super().__init__(optimizer=lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, nesterov=True,
                                                                   weight_decay=1e-3))
        self.net = digits_resnet18()


class RecordingLinear(nn.Linear):
    """Records every call: on the main thread or not, the input's storage, and the weight it read."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list[tuple[bool, int, torch.Tensor]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        on_main = threading.current_thread() is threading.main_thread()
        self.calls.append((on_main, x.data_ptr(), self.weight.detach().clone()))
        return super().forward(x)


class CheckpointedDigits(DigitsClassifier):
    """The digits MLP (BatchNorm included) with its first block checkpointed."""

    def __init__(self, reentrant: bool, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.reentrant = reentrant
        self.net[0] = RecordingLinear(64, self.net[0].out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reentrant:
            x = x.requires_grad_()  # the reentrant form needs an input that requires grad
        hidden = checkpoint(self.net[:3], x, use_reentrant=self.reentrant)
        return self.net[3:](hidden)
