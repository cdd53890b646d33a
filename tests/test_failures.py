"""Failure paths: an exception anywhere stops training quickly, keeps its type and traceback, leaves no thread."""

from __future__ import annotations

import time
import traceback
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_pdasgd import EngineTimeoutError, PDASGDStrategy
from tests.helpers import engine_threads, trainer_kwargs
from tests.models import DelayedBackward, DigitsClassifier, DigitsData


class BackwardBoom(torch.autograd.Function):
    """Identity forward; its backward raises on a chosen call, inside a backward thread."""

    calls = 0
    fail_at = 5

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        BackwardBoom.calls += 1
        if BackwardBoom.calls == BackwardBoom.fail_at:
            raise ValueError("boom in backward")
        return grad


class FailingBackwardModel(DigitsClassifier):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return BackwardBoom.apply(self.net(x))


class StepBoomSGD(torch.optim.SGD):
    """An optimizer whose per-parameter step raises after a number of updates (a failure in the update hook)."""

    steps = 0

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        StepBoomSGD.steps += 1
        if StepBoomSGD.steps == 40:
            raise ArithmeticError("boom in optimizer step")
        return super().step(closure)


def _fit(model: L.LightningModule, strategy: Any = None, **kwargs: Any) -> L.Trainer:
    trainer = L.Trainer(strategy=strategy or PDASGDStrategy(), max_epochs=2, **trainer_kwargs(**kwargs))
    trainer.fit(model, DigitsData(batch_size=16))
    return trainer


def test_backward_thread_exception_reaches_fit_with_traceback() -> None:
    BackwardBoom.calls = 0
    started = time.monotonic()
    with pytest.raises(ValueError, match="boom in backward") as excinfo:
        _fit(FailingBackwardModel())
    assert time.monotonic() - started < 30
    frames = traceback.extract_tb(excinfo.value.__traceback__)
    assert any(frame.name == "backward" and frame.filename == __file__ for frame in frames), "original traceback lost"
    assert engine_threads() == []


def test_update_hook_exception_reaches_fit() -> None:
    StepBoomSGD.steps = 0
    model = DigitsClassifier(optimizer=lambda p: StepBoomSGD(p, lr=0.1))
    with pytest.raises(ArithmeticError, match="boom in optimizer step"):
        _fit(model)
    assert engine_threads() == []


class RaiseInCallback(Callback):
    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == 7:
            raise KeyError("boom in callback")


def test_callback_exception_stops_engine() -> None:
    with pytest.raises(KeyError, match="boom in callback"):
        _fit(DigitsClassifier(), callbacks=[RaiseInCallback()])
    assert engine_threads() == []


class RaiseInTrainingStep(DigitsClassifier):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if batch_idx == 9:
            raise IndexError("boom in training_step")
        return super().training_step(batch, batch_idx)


def test_forward_exception_releases_everything() -> None:
    strategy = PDASGDStrategy()
    with pytest.raises(IndexError, match="boom in training_step"):
        _fit(RaiseInTrainingStep(), strategy=strategy)
    assert engine_threads() == [] and strategy.engine is None


class SlowModel(DigitsClassifier):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return DelayedBackward.apply(self.net(x), 1.5)


def test_wait_timeout_names_the_wait() -> None:
    # two slots, one slow backward thread: the third forward waits for a slot (with max_in_flight=1 the batch-end
    # drain, which makes batch-end hooks see the update as in a plain step, would be the wait that times out)
    strategy = PDASGDStrategy(backward_threads=1, max_in_flight=2, wait_timeout=0.3, synchronous_warmup=0)
    with pytest.raises(EngineTimeoutError, match=r"wait_timeout.*in-flight slot \(`max_in_flight`\)"):
        _fit(SlowModel(), strategy=strategy)
    assert engine_threads() == []


def test_non_scalar_loss_raises_in_main_thread() -> None:
    class VectorLoss(DigitsClassifier):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return nn.functional.cross_entropy(self(x), y, reduction="none")

    with pytest.raises(RuntimeError, match="grad can be implicitly created only for scalar outputs") as excinfo:
        _fit(VectorLoss())
    assert "check_loss" in [frame.name for frame in traceback.extract_tb(excinfo.value.__traceback__)]


class SkipSomeBatches(DigitsClassifier):
    def training_step(self, batch: Any, batch_idx: int) -> Any:
        if batch_idx % 4 == 3:
            return None  # Lightning's "skip this batch"
        return super().training_step(batch, batch_idx)


def test_training_step_returning_none_skips_like_plain_lightning() -> None:
    results = {}
    for name, strategy in (("plain", "auto"), ("pdasgd", PDASGDStrategy(max_in_flight=1))):
        L.seed_everything(3)
        model = SkipSomeBatches()
        trainer = L.Trainer(strategy=strategy, max_steps=30, limit_val_batches=0, **trainer_kwargs())
        trainer.fit(model, DigitsData(batch_size=16))
        results[name] = (trainer.global_step, [p.detach().clone() for p in model.parameters()])
    assert results["plain"][0] == results["pdasgd"][0] == 30
    for plain, pdasgd in zip(results["plain"][1], results["pdasgd"][1]):
        assert (plain - pdasgd).abs().max() <= 1e-6
