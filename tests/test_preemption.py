"""Preemption (SIGTERM, Ctrl-C): nothing in flight is lost, a drained checkpoint is written, training resumes."""

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

from lightning_pdasgd import PDASGDStrategy
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
