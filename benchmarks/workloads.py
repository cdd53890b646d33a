"""The workloads: which model, which offline data, which optimizer settings and which accuracy target.

Every configuration of a benchmark run trains the same workload with the same seed, batch size (per device) and
optimizer, so differences come from the strategy alone. Plain data, no Lightning import (calibration uses it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from torch import nn
from torch.utils.data import TensorDataset

from benchmarks import models


@dataclass(frozen=True)
class Workload:
    """A model + dataset + optimizer setting + validation-accuracy target (for time-to-accuracy)."""

    name: str
    description: str
    build_model: Callable[[], nn.Module]
    target_accuracy: float
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 1e-4
    needs_cifar10: bool = False
    synthetic: Optional[tuple[tuple[int, ...], int, int]] = None  # (input shape, train size, val size)

    def datasets(
        self,
        seed: int,
        cifar10_dir: Optional[str] = None,
        train_limit: Optional[int] = None,
        val_limit: Optional[int] = None,
    ) -> tuple[TensorDataset, TensorDataset]:
        if self.needs_cifar10:
            folder = models.find_cifar10(cifar10_dir)
            if folder is None:
                raise FileNotFoundError(self.unavailable_reason(cifar10_dir) or "CIFAR-10 not found")
            return models.cifar10_datasets(folder, train_limit, val_limit)
        if self.synthetic is not None:
            shape, train_size, val_size = self.synthetic
            train, val = models.synthetic_datasets(shape, train_size, val_size, seed)
        else:
            train, val = models.digits_datasets(seed)
        if train_limit is not None:
            train = TensorDataset(*(t[:train_limit] for t in train.tensors))
        if val_limit is not None:
            val = TensorDataset(*(t[:val_limit] for t in val.tensors))
        return train, val

    def unavailable_reason(self, cifar10_dir: Optional[str]) -> Optional[str]:
        """Why this workload cannot run here (``None`` when it can): only CIFAR-10 data can be missing."""
        if not self.needs_cifar10 or models.find_cifar10(cifar10_dir) is not None:
            return None
        where = cifar10_dir or f"${models.CIFAR10_ENV}"
        return (
            f"CIFAR-10 not found (looked for cifar-10-batches-py/data_batch_1 under {where!s}); pass"
            f" --cifar10-dir or set {models.CIFAR10_ENV} to the extracted python version. Never downloaded."
        )


WORKLOADS: dict[str, Workload] = {
    workload.name: workload
    for workload in (
        Workload(
            name="digits-mlp",
            description="MLP 64-256-256-10 with BatchNorm on scikit-learn digits (8x8, 1,437 train / 360 val)",
            build_model=models.digits_mlp,
            target_accuracy=0.97,
        ),
        Workload(
            name="digits-cnn",
            description="CNN conv32-conv64-pool-fc128 with BatchNorm on scikit-learn digits (8x8 images)",
            build_model=models.digits_cnn,
            target_accuracy=0.97,
        ),
        Workload(
            name="wide-mlp",
            description="MLP 784-1024-1024-10 on synthetic learnable 784-dim data (8,192 train / 1,024 val),"
            " batch 128: ~10 ms of compute per step on 2 CPU cores",
            build_model=models.wide_mlp,
            target_accuracy=0.90,
            batch_size=128,
            lr=0.02,
            synthetic=((784,), 8192, 1024),
        ),
        Workload(
            name="cnn32",
            description="CNN conv32-pool-conv64-pool-fc128 with BatchNorm on synthetic learnable 3x32x32 images"
            " (4,096 train / 1,024 val), batch 64: several ms of compute per step on 2 CPU cores",
            build_model=models.small_cnn32,
            target_accuracy=0.90,
            batch_size=64,
            lr=0.02,
            synthetic=((3, 32, 32), 4096, 1024),
        ),
        Workload(
            name="cifar10-resnet18",
            description="ResNet-18 (CIFAR stem) on CIFAR-10 (a fixed prefix of the data on CPU)",
            build_model=models.cifar_resnet18,
            target_accuracy=0.50,
            batch_size=64,
            lr=0.05,
            weight_decay=5e-4,
            needs_cifar10=True,
        ),
    )
}


def get(name: str) -> Workload:
    try:
        return WORKLOADS[name]
    except KeyError:
        raise KeyError(f"unknown workload {name!r}; known: {sorted(WORKLOADS)}") from None


def cifar10_path_argument(path: Optional[str]) -> Optional[str]:
    """Normalise ``--cifar10-dir`` to an absolute path so that subprocesses resolve it the same way."""
    return str(Path(path).resolve()) if path else None
