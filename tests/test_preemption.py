"""Preemption (SIGTERM, Ctrl-C) and non-finite numbers: nothing in flight is lost, nothing bad is applied."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerStatus
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lightning_pdasgd import NonFiniteError, PDASGDStrategy
from tests.helpers import engine_threads, trainer_kwargs
from tests.models import DigitsClassifier, DigitsData

BATCHES = 45  # digits: 1,437 training images in batches of 32


def _adam_model() -> DigitsClassifier:
    return DigitsClassifier(optimizer=lambda p: torch.optim.Adam(p, lr=3e-3))


class SignalAt(Callback):
    """Sends this process a signal after a given global step (what a scheduler does to a job)."""

    def __init__(self, step: int, signum: int = signal.SIGTERM) -> None:
        self.step, self.signum = step, signum

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            if self.signum == signal.SIGINT:
                raise KeyboardInterrupt  # what Python's default SIGINT handler raises
            os.kill(os.getpid(), self.signum)


def _assert_drained(path: Path) -> int:
    checkpoint = torch.load(path, weights_only=False)
    steps = {int(state["step"]) for state in checkpoint["optimizer_states"][0]["state"].values()}
    assert steps == {checkpoint["global_step"]}, "every handed-off update applied exactly once"
    return int(checkpoint["global_step"])


def test_sigterm_drains_checkpoints_and_resumes(tmp_path: Path) -> None:
    L.seed_everything(0)
    strategy = PDASGDStrategy(backward_threads=3, max_in_flight=6)
    trainer = L.Trainer(strategy=strategy, max_epochs=3, default_root_dir=tmp_path, callbacks=[SignalAt(60)],
                        **trainer_kwargs())
    with pytest.raises(SIGTERMException):
        trainer.fit(_adam_model(), DigitsData(batch_size=32))
    assert engine_threads() == []
    saved_step = _assert_drained(tmp_path / "hpc_ckpt_1.ckpt")
    assert saved_step == 60 == trainer.global_step  # the batch that got the signal finished, nothing after it

    L.seed_everything(0)
    resumed = L.Trainer(strategy=PDASGDStrategy(backward_threads=3), max_epochs=3, default_root_dir=tmp_path,
                        **trainer_kwargs())
    model = _adam_model()
    resumed.fit(model, DigitsData(batch_size=32), ckpt_path="hpc")
    assert resumed.global_step == 3 * BATCHES
    state = resumed.optimizers[0].state_dict()["state"]
    assert {int(s["step"]) for s in state.values()} == {3 * BATCHES}
    assert model.val_accuracy[-1] >= 0.9


def test_keyboard_interrupt_saves_the_same_way(tmp_path: Path) -> None:
    handler = signal.getsignal(signal.SIGINT)
    try:
        trainer = L.Trainer(strategy="pdasgd", max_epochs=2, default_root_dir=tmp_path,
                            callbacks=[SignalAt(20, signal.SIGINT)], **trainer_kwargs())
        with pytest.raises(SystemExit):  # Lightning's graceful shutdown ends with sys.exit(1)
            trainer.fit(_adam_model(), DigitsData(batch_size=32))
        assert trainer.state.status == TrainerStatus.INTERRUPTED and trainer.interrupted
    finally:
        signal.signal(signal.SIGINT, handler)
    assert engine_threads() == []
    assert _assert_drained(tmp_path / "hpc_ckpt_1.ckpt") == 20


def test_preemption_checkpoint_can_be_turned_off(tmp_path: Path) -> None:
    trainer = L.Trainer(strategy=PDASGDStrategy(checkpoint_on_preemption=False), max_epochs=2,
                        default_root_dir=tmp_path, callbacks=[SignalAt(5)], **trainer_kwargs())
    with pytest.raises(SIGTERMException):
        trainer.fit(_adam_model(), DigitsData(batch_size=32))
    assert not list(tmp_path.rglob("hpc_ckpt_*.ckpt"))


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
