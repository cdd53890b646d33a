"""Plain-torch models and offline datasets of the workloads.

Kept free of Lightning so that calibration (FLOP counting, forward/backward timing) can run in a light
subprocess and measures the model alone, not the training framework.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from torch.utils.data import TensorDataset

CIFAR10_ENV = "CIFAR10_DIR"


def digits_datasets(seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """scikit-learn's bundled 8x8 digits (1,797 real images, no download), split 80/20 with a fixed permutation."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    split = int(0.8 * len(x))
    return TensorDataset(x[:split], y[:split]), TensorDataset(x[split:], y[split:])


def synthetic_datasets(
    shape: tuple[int, ...], train: int, val: int, seed: int = 0, classes: int = 10, noise: float = 3.0
) -> tuple[TensorDataset, TensorDataset]:
    """Offline, learnable, any size: each class is a fixed random prototype plus Gaussian noise.

    For workloads whose compute per step matters more than the data (>= 5 ms per step on the CPU); ``noise``
    keeps the task from being solved in a few steps.
    """
    generator = torch.Generator().manual_seed(1234)  # the task is the same for every seed; the split order is not
    prototypes = torch.randn(classes, *shape, generator=generator)
    labels = torch.randint(0, classes, (train + val,), generator=generator)
    x = prototypes[labels] + noise * torch.randn(train + val, *shape, generator=generator)
    order = torch.randperm(train + val, generator=torch.Generator().manual_seed(seed))
    x, labels = x[order], labels[order]
    return TensorDataset(x[:train], labels[:train]), TensorDataset(x[train:], labels[train:])


def wide_mlp() -> nn.Module:
    """MLP 784-1024-1024-10: about 10 ms of compute per step of 128 on 2 CPU cores."""
    return nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))


def small_cnn32() -> nn.Module:
    """A CNN on 3x32x32 inputs (conv32-pool-conv64-pool-fc128): several ms per step of 64 on 2 CPU cores."""
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 8 * 8, 128), nn.ReLU(), nn.Linear(128, 10),
    )


def digits_mlp(hidden: int = 256) -> nn.Module:
    """The README example's MLP: two hidden layers with BatchNorm."""
    return nn.Sequential(
        nn.Linear(64, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
        nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
        nn.Linear(hidden, 10),
    )


def digits_cnn() -> nn.Module:
    """A small CNN on the 8x8 digit images (flattened rows of 64 pixels in, reshaped here)."""
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 4 * 4, 128), nn.ReLU(),
        nn.Linear(128, 10),
    )


def digits_resnet18() -> nn.Module:
    """torchvision's ResNet-18 (BatchNorm) on the digits, upsampled to 16x16, with a 3x3 stride-1 stem and no
    max-pool: the paper's headline model at a size two CPU cores train in seconds per epoch."""
    from torchvision.models import resnet18

    model = resnet18(num_classes=10)
    model.conv1 = nn.Conv2d(1, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Upsample(size=(16, 16), mode="bilinear"), model)


def digits_torchvision(name: str) -> nn.Module:
    """A torchvision classification model by name, from scratch, on the digits upsampled to 3x32x32 (small enough
    for a CPU, large enough for every model's downsampling). GoogLeNet without its auxiliary heads (Lightning's
    ``training_step`` gets one output)."""
    import torchvision.models

    extra = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
    model = getattr(torchvision.models, name)(num_classes=10, **extra)
    return nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Upsample(size=(32, 32), mode="bilinear"),
                         nn.Conv2d(1, 3, kernel_size=1), model)


def digits_vgg_bn() -> nn.Module:
    """A VGG-style CNN with BatchNorm after every convolution (8 conv layers, 16x16 digits)."""
    layers: list[nn.Module] = [nn.Unflatten(1, (1, 8, 8)), nn.Upsample(size=(16, 16), mode="bilinear")]
    channels = 1
    for width, pool in ((32, False), (32, True), (64, False), (64, True), (128, False), (128, True),
                        (256, False), (256, True)):
        layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
        if pool:
            layers.append(nn.MaxPool2d(2))
        channels = width
    layers += [nn.Flatten(), nn.Linear(256, 10)]
    return nn.Sequential(*layers)


def cifar_resnet18() -> nn.Module:
    """torchvision's ResNet-18 with the usual CIFAR stem (3x3 stride-1 first conv, no max-pool)."""
    from torchvision.models import resnet18

    model = resnet18(num_classes=10)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def find_cifar10(explicit: Optional[str]) -> Optional[Path]:
    """The folder holding CIFAR-10's python batches (``data_batch_1`` ...), from the argument or ``$CIFAR10_DIR``.

    Accepts either that folder or its parent (torchvision's ``root`` with ``cifar-10-batches-py`` inside).
    Never downloads: ``None`` means the workload is skipped.
    """
    raw = explicit or os.environ.get(CIFAR10_ENV)
    if not raw:
        return None
    for candidate in (Path(raw), Path(raw) / "cifar-10-batches-py"):
        if (candidate / "data_batch_1").is_file() and (candidate / "test_batch").is_file():
            return candidate
    return None


_CIFAR_MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
_CIFAR_STD = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)


def _load_cifar_batches(folder: Path, names: list[str], limit: Optional[int]) -> TensorDataset:
    images, labels = [], []
    for name in names:
        with open(folder / name, "rb") as handle:
            entry = pickle.load(handle, encoding="latin1")
        images.append(torch.as_tensor(entry["data"], dtype=torch.uint8))
        labels.append(torch.as_tensor(entry["labels"], dtype=torch.long))
        if limit is not None and sum(len(y) for y in labels) >= limit:
            break
    x = torch.cat(images)[:limit].view(-1, 3, 32, 32).float().div_(255.0)
    x = (x - _CIFAR_MEAN) / _CIFAR_STD
    return TensorDataset(x, torch.cat(labels)[:limit])


def cifar10_datasets(
    folder: Path, train_limit: Optional[int] = None, val_limit: Optional[int] = None
) -> tuple[TensorDataset, TensorDataset]:
    """CIFAR-10 from its python pickles, normalised, optionally truncated (a fixed prefix) to fit a CPU budget."""
    train = _load_cifar_batches(folder, [f"data_batch_{i}" for i in range(1, 6)], train_limit)
    val = _load_cifar_batches(folder, ["test_batch"], val_limit)
    return train, val
