"""Non-finite numbers (NaN/Inf loss or gradient, the ``nonfinite=`` setting): nothing bad is applied."""

from __future__ import annotations

from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lightning_pdasgd import NonFiniteError, PDASGDStrategy
from tests.helpers import trainer_kwargs
from tests.models import DigitsClassifier, DigitsData

BATCHES = 45  # digits: 1,437 training images in batches of 32


class PoisonGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad * float("nan")


class NanAt(DigitsClassifier):
    """Poisons one parameter's gradient (or the loss) at a chosen step."""

    def __init__(self, step: int, where: str) -> None:
        super().__init__(optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
        self.bad_step, self.where = step, where

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        if self.trainer.global_step != self.bad_step:
            return loss
        if self.where == "loss":
            return loss * float("nan")
        # a finite loss whose gradient for one parameter is NaN
        return loss + PoisonGradient.apply(self.net[3].weight).sum() * 0.0


@pytest.mark.parametrize("where", ["loss", "gradient"])
def test_nonfinite_error_names_step_parameter_and_rank(where: str) -> None:
    model = NanAt(step=12, where=where)
    before: dict[str, torch.Tensor] = {}

    class Snapshot(Callback):
        def on_train_batch_start(self, trainer: L.Trainer, module: Any, *args: Any) -> None:
            if trainer.global_step == 12:
                trainer.strategy.drain()
                before.update({k: v.detach().clone() for k, v in module.named_parameters()})

    trainer = L.Trainer(strategy=PDASGDStrategy(max_in_flight=1), max_epochs=1, callbacks=[Snapshot()],
                        **trainer_kwargs())
    expected = "non-finite loss" if where == "loss" else "non-finite gradient for parameter 'net.3.weight'"
    with pytest.raises(NonFiniteError, match=f"{expected}.* at step 12 on rank 0"):
        trainer.fit(model, DigitsData(batch_size=32))
    for name, value in model.named_parameters():
        assert torch.isfinite(value).all(), name
    if where == "gradient":  # nothing of the poisoned parameter's update reached it
        assert torch.equal(model.net[3].weight.detach(), before["net.3.weight"])


@pytest.mark.parametrize("where", ["loss", "gradient"])
def test_nonfinite_skip_policy_drops_and_counts(where: str) -> None:
    L.seed_everything(0)
    model = NanAt(step=12, where=where)
    strategy = PDASGDStrategy(nonfinite="skip")
    trainer = L.Trainer(strategy=strategy, max_epochs=3, **trainer_kwargs())
    trainer.fit(model, DigitsData(batch_size=32))
    assert trainer.global_step == 3 * BATCHES
    assert strategy.stats.total_skipped == (len(list(model.parameters())) if where == "loss" else 1)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert model.val_accuracy[-1] >= 0.9
