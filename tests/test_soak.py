"""Long-run soak: memory, live tensors and threads stay flat (``pytest -m soak``; CI runs a short form).

``PDASGD_SOAK_STEPS`` sets the length (default 20,000 steps); resident memory is compared after a warm-up.
"""

from __future__ import annotations

import gc
import os
import threading
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_pdasgd import PDASGDStrategy
from tests.helpers import trainer_kwargs

pytestmark = pytest.mark.soak


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _live_tensors() -> int:
    return sum(1 for obj in gc.get_objects() if isinstance(obj, torch.Tensor))


class Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 2))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


class Probe(Callback):
    def __init__(self, warmup: int, every: int) -> None:
        self.warmup, self.every = warmup, every
        self.samples: list[tuple[int, int, int, int]] = []

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        step = trainer.global_step
        if step >= self.warmup and step % self.every == 0:
            trainer.strategy.drain()
            gc.collect()
            self.samples.append((step, _rss_bytes(), _live_tensors(), threading.active_count()))


def test_soak_memory_tensors_and_threads_stay_flat() -> None:
    steps = int(os.environ.get("PDASGD_SOAK_STEPS", "20000"))
    warmup = max(steps // 5, 200)
    data = TensorDataset(torch.randn(4096, 16), torch.randint(0, 2, (4096,)))
    probe = Probe(warmup=warmup, every=max((steps - warmup) // 10, 1))
    trainer = L.Trainer(strategy=PDASGDStrategy(backward_threads=2), max_steps=steps, callbacks=[probe],
                        log_every_n_steps=50, **trainer_kwargs())
    trainer.fit(Tiny(), DataLoader(data, batch_size=16, shuffle=True))
    assert trainer.global_step == steps
    first, last = probe.samples[0], probe.samples[-1]
    assert len(probe.samples) >= 5
    growth = (last[1] - first[1]) / first[1]
    assert growth < 0.05, f"resident memory grew {growth:.1%} after warm-up: {probe.samples}"
    assert last[2] <= first[2], f"live tensors grew: {probe.samples}"
    assert last[3] == first[3], f"threads changed: {probe.samples}"
