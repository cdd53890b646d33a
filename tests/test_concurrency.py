"""Exact update accounting under concurrent backward passes, staleness measurement, and real learning."""

from __future__ import annotations

import threading
from typing import Any

import lightning as L
import pytest
import torch

from lightning_pdasgd import PDASGDStrategy
from tests.helpers import trainer_kwargs
from tests.models import LR, DigitsClassifier, DigitsData, LinearLoss, integer_batches


@pytest.mark.parametrize(
    "strategy_kwargs",
    [
        dict(backward_threads=4, max_in_flight=8),
        dict(backward_threads=2),
        dict(backward_threads=3, max_in_flight=6, layerwise=False),
    ],
    ids=["4threads-8inflight", "default-ratio", "dasgd-ablation"],
)
def test_no_update_lost_or_doubled(strategy_kwargs: dict[str, Any]) -> None:
    width, steps = 512, 300
    loader = integer_batches(steps, width)
    total = torch.cat([batch for (batch,) in loader]).sum(dim=0)
    model = LinearLoss(width)
    strategy = PDASGDStrategy(**strategy_kwargs)
    trainer = L.Trainer(strategy=strategy, max_epochs=1, **trainer_kwargs())
    trainer.fit(model, loader)

    assert trainer.global_step == steps
    assert torch.equal(model.first.detach(), -LR * total)
    assert torch.equal(model.second.detach(), -LR * 2 * total)
    assert torch.equal(model.shared.weight.detach().squeeze(0), -LR * 2 * total)
    assert torch.equal(model.frozen.detach(), torch.ones(width, dtype=torch.float64))
    assert strategy.stats.total_backwards == steps
    assert strategy.stats.total_updates == steps * 3  # first, second, shared (tied counted once)
    assert strategy.updater is None, "the engine is released when fit ends"


class _WaitForForwards(torch.autograd.Function):
    """Identity whose backward for batch ``i`` waits until the forward of batch ``i + lead`` has run.

    Holding every backward until ``lead`` later forwards have read the weights makes the staleness exact, with
    no race against a sleep: each of those forwards read the weights while this update was not yet applied.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, gate: "_ForwardGate", index: int) -> torch.Tensor:
        ctx.gate, ctx.index = gate, index
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        ctx.gate.wait_for(ctx.index)
        return grad, None, None


class _ForwardGate:
    def __init__(self, lead: int, total: int) -> None:
        self.lead, self.total, self.forwards = lead, total, 0
        self._changed = threading.Condition()

    def forward_done(self) -> None:
        with self._changed:
            self.forwards += 1
            self._changed.notify_all()

    def wait_for(self, index: int) -> None:
        needed = min(index + 1 + self.lead, self.total)
        with self._changed:
            if not self._changed.wait_for(lambda: self.forwards >= needed, timeout=30):
                raise TimeoutError(f"forward {needed} never ran while backward {index} waited")


class GatedLinearLoss(LinearLoss):
    def __init__(self, width: int, lead: int, total: int) -> None:
        super().__init__(width)
        self.gate = _ForwardGate(lead, total)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = _WaitForForwards.apply(super().training_step(batch, batch_idx), self.gate, batch_idx)
        self.gate.forward_done()
        return loss


def test_staleness_is_measured_per_parameter() -> None:
    """Staleness counts the updates of a parameter between its read and its own update.

    One backward thread applies backwards in hand-off order, so with M losses in flight a forward reads while at
    most M - 1 earlier ones are unapplied: staleness <= M - 1; backwards held until M - 1 later forwards ran make
    every update from the M-th on exactly that stale.
    """
    steps = 60
    loader = integer_batches(steps, 64)
    one = PDASGDStrategy(max_in_flight=1)
    L.Trainer(strategy=one, max_epochs=1, **trainer_kwargs()).fit(GatedLinearLoss(64, 0, steps), loader)
    assert one.stats.total_staleness_max == 0 and one.stats.mean_staleness == 0.0

    three = PDASGDStrategy(backward_threads=1, max_in_flight=3, synchronous_warmup=0)
    L.Trainer(strategy=three, max_epochs=1, **trainer_kwargs()).fit(GatedLinearLoss(64, 2, steps), loader)
    assert three.stats.total_staleness_max == 2
    assert 1.0 < three.stats.mean_staleness <= 2.0
    assert three.stats.total_updates == steps * 3


@pytest.mark.parametrize("layerwise", [True, False], ids=["pdasgd", "dasgd"])
def test_learns_digits_with_default_threads(layerwise: bool) -> None:
    L.seed_everything(0)
    model = DigitsClassifier(optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9))
    strategy = PDASGDStrategy(layerwise=layerwise)
    assert (strategy.forward_threads, strategy.backward_threads, strategy.max_in_flight) == (1, 2, 2)
    trainer = L.Trainer(strategy=strategy, max_epochs=6, **trainer_kwargs())
    trainer.fit(model, DigitsData(batch_size=32))
    assert max(model.val_accuracy) >= 0.95 and model.val_accuracy[-1] >= 0.9, model.val_accuracy
    assert strategy.stats.total_backwards == trainer.global_step
