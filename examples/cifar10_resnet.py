"""CIFAR-10 with torchvision's ResNet-18 (stem adapted to 32x32 images), trained with PD-ASGD.

Run from the repository root (the configs name these classes as ``examples.cifar10_resnet.*``)::

    lightning-pdasgd fit --config examples/configs/cifar10_resnet18_1gpu.yaml --data.download true   # first run
    lightning-pdasgd fit --config examples/configs/cifar10_resnet18_1gpu.yaml                         # data in place
    lightning-pdasgd fit --config examples/configs/cifar10_resnet18_ngpu.yaml                         # devices: -1
    lightning-pdasgd report lightning_logs/cifar10_resnet18                                           # the plots

The data: torchvision's CIFAR-10 in ``data_dir`` (default ``data/cifar10``), i.e. the folder
``data/cifar10/cifar-10-batches-py/`` extracted from ``cifar-10-python.tar.gz``. It is downloaded (170 MB) only with
``--data.download true``. The 10,000 test images are the validation set. Training uses the standard augmentation
(random crop 32 with 4-pixel padding, horizontal flip) and per-channel normalisation.

``--data.synthetic true`` replaces the data with a few batches of random tensors of CIFAR-10's shape: no download,
no accuracy, for checking that a configuration runs (the smoke test uses it on the CPU).

Expected accuracy and time: not measured yet. The machine this example was written on has 2 CPU cores, no GPU, no
copy of CIFAR-10 and no internet, so no real run was made; only the synthetic smoke run (CPU,
``tests/test_examples.py``), which checks that the configuration trains and logs, not what it reaches.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torchmetrics
from lightning.pytorch import LightningDataModule, LightningModule
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR10_FOLDER = "cifar-10-batches-py"  # what torchvision's CIFAR10 reads inside its root
CIFAR10_FILES = (*(f"data_batch_{index}" for index in range(1, 6)), "test_batch", "batches.meta")
NUM_CLASSES = 10


def cifar_resnet18(num_classes: int = NUM_CLASSES) -> nn.Module:
    """torchvision's ResNet-18 with the usual CIFAR stem: a 3x3 stride-1 first convolution and no max-pool.

    The ImageNet stem (7x7 stride 2, then a stride-2 max-pool) shrinks a 32x32 image to 8x8 before the first block
    and costs several points of accuracy on CIFAR-10.
    """
    from torchvision.models import resnet18

    model = resnet18(weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def missing_cifar10_files(data_dir: Path) -> list[str]:
    """The CIFAR-10 files torchvision needs that are not under ``data_dir`` (empty when the data is in place)."""
    folder = data_dir / CIFAR10_FOLDER
    return [name for name in CIFAR10_FILES if not (folder / name).is_file()]


class CIFAR10DataModule(LightningDataModule):
    """CIFAR-10 from torchvision, the test split as validation, or random tensors of its shape (``synthetic``).

    Args:
        data_dir: folder that holds (or will hold) ``cifar-10-batches-py/``.
        download: download CIFAR-10 into ``data_dir`` when it is missing (170 MB). Never done unless asked.
        batch_size: training and validation batch size.
        num_workers: DataLoader worker processes.
        synthetic: use ``synthetic_batches`` random training batches and one validation batch instead of the data.
        synthetic_batches: number of synthetic training batches.
    """

    def __init__(
        self,
        data_dir: str = "data/cifar10",
        download: bool = False,
        batch_size: int = 128,
        num_workers: int = 4,
        synthetic: bool = False,
        synthetic_batches: int = 4,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.data_dir = Path(data_dir)
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    def prepare_data(self) -> None:
        if self.hparams.download and not self.hparams.synthetic:
            from torchvision.datasets import CIFAR10

            CIFAR10(str(self.data_dir), train=True, download=True)
            CIFAR10(str(self.data_dir), train=False, download=True)

    def setup(self, stage: str) -> None:
        if self.hparams.synthetic:
            self.train_set = synthetic_cifar10(self.hparams.synthetic_batches * self.hparams.batch_size, seed=0)
            self.val_set = synthetic_cifar10(self.hparams.batch_size, seed=1)
            return
        self._check_data()
        from torchvision.datasets import CIFAR10

        try:
            self.train_set = CIFAR10(str(self.data_dir), train=True, transform=train_transform())
            self.val_set = CIFAR10(str(self.data_dir), train=False, transform=eval_transform())
        except RuntimeError as error:  # torchvision's checksum test failed: a partial or corrupted copy
            raise RuntimeError(f"{error} {self._where_to_put_it()}") from error

    def _check_data(self) -> None:
        missing = missing_cifar10_files(self.data_dir)
        if not missing:
            return
        folder = self.data_dir / CIFAR10_FOLDER
        what = f"{', '.join(missing)} in '{folder}'" if folder.is_dir() else f"the folder '{folder}'"
        raise FileNotFoundError(f"CIFAR-10 is not in `data_dir`: missing {what}. {self._where_to_put_it()}")

    def _where_to_put_it(self) -> str:
        return (
            f"Extract cifar-10-python.tar.gz into '{self.data_dir.resolve()}' (it makes the '{CIFAR10_FOLDER}' folder),"
            f" point `--data.data_dir` at the folder that holds '{CIFAR10_FOLDER}', or pass `--data.download true`"
            " to download it (170 MB)."
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def _loader(self, dataset: Dataset | None, shuffle: bool) -> DataLoader:
        assert dataset is not None, "setup() has not run"
        workers = 0 if self.hparams.synthetic else self.hparams.num_workers
        return DataLoader(
            dataset,
            batch_size=self.hparams.batch_size,
            shuffle=shuffle,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
            drop_last=shuffle,
        )


def train_transform() -> Any:
    """The standard CIFAR augmentation: random 32x32 crop of the 4-pixel-padded image, horizontal flip."""
    from torchvision import transforms

    return transforms.Compose([
        transforms.RandomCrop(32, padding=4),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(CIFAR10_MEAN, CIFAR10_STD),
    ])


def eval_transform() -> Any:
    from torchvision import transforms

    return transforms.Compose([transforms.ToTensor(), transforms.Normalize(CIFAR10_MEAN, CIFAR10_STD)])


def synthetic_cifar10(size: int, seed: int) -> TensorDataset:
    """Normalised-looking random images and random labels: checks that a configuration runs, learns nothing."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(size, 3, 32, 32, generator=generator)
    labels = torch.randint(0, NUM_CLASSES, (size,), generator=generator)
    return TensorDataset(images, labels)


class ResNet18Classifier(LightningModule):
    """ResNet-18 on 32x32 images; SGD with Nesterov momentum, weight decay and a per-epoch cosine schedule.

    Args:
        num_classes: output classes.
        lr: peak learning rate (for batch size 128).
        momentum: SGD momentum.
        weight_decay: L2 penalty, applied by SGD.
        label_smoothing: cross-entropy label smoothing.
    """

    def __init__(
        self,
        num_classes: int = NUM_CLASSES,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = cifar_resnet18(num_classes)
        self.train_accuracy = torchmetrics.Accuracy(task="multiclass", num_classes=num_classes)
        self.val_accuracy = torchmetrics.Accuracy(task="multiclass", num_classes=num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images, labels = batch
        logits = self(images)
        loss = nn.functional.cross_entropy(logits, labels, label_smoothing=self.hparams.label_smoothing)
        self.train_accuracy(logits.detach(), labels)
        self.log("train_loss", loss, prog_bar=True)
        self.log("train_acc", self.train_accuracy, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        images, labels = batch
        logits = self(images)
        self.val_accuracy(logits, labels)
        self.log("val_loss", nn.functional.cross_entropy(logits, labels))
        self.log("val_acc", self.val_accuracy, prog_bar=True)

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(
            self.parameters(),
            lr=self.hparams.lr,
            momentum=self.hparams.momentum,
            nesterov=True,
            weight_decay=self.hparams.weight_decay,
        )
        epochs = self.trainer.max_epochs if self.trainer.max_epochs and self.trainer.max_epochs > 0 else 30
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
