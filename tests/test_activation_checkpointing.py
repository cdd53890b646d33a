"""Activation checkpointing (``torch.utils.checkpoint``): a segment recomputed during the backward, on a backward
thread, reads the weights its forward read (``engine/recomputation.py``).

Before: with ``use_reentrant=True`` the recomputation never ran (the backward was limited to the stash's leaves) and
the checkpointed layers silently never trained; with ``use_reentrant=False`` it read whatever the modules held at
that moment, mostly the next forward's weights.
"""

from __future__ import annotations

import threading
from typing import Any

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lightning_pdasgd import PDASGDStrategy
from tests.helpers import DIGITS_OPTIMIZERS, assert_same_training_state, step_scheduler, trainer_kwargs
from tests.models import DigitsClassifier, DigitsData


class _RecordingLinear(nn.Linear):
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
        self.net[0] = _RecordingLinear(64, self.net[0].out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reentrant:
            x = x.requires_grad_()  # the reentrant form needs an input that requires grad
        hidden = checkpoint(self.net[:3], x, use_reentrant=self.reentrant)
        return self.net[3:](hidden)


def _fit(strategy: Any, reentrant: bool, steps: int) -> tuple[CheckpointedDigits, L.Trainer]:
    L.seed_everything(1234)
    model = CheckpointedDigits(reentrant, optimizer=DIGITS_OPTIMIZERS["sgd_momentum_nesterov_wd"],
                               scheduler=step_scheduler)
    trainer = L.Trainer(strategy=strategy, max_steps=steps, limit_val_batches=0, **trainer_kwargs())
    trainer.fit(model, DigitsData(batch_size=32))
    return model, trainer


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_checkpointed_segments_train_bitwise_as_plain_lightning(reentrant: bool) -> None:
    """The engine at one loss in flight (``conftest.py``): the same weights, buffers and optimizer state."""
    plain, plain_trainer = _fit("auto", reentrant, steps=30)
    strategy = PDASGDStrategy(max_in_flight=1, synchronous_warmup=0)
    pdasgd, trainer = _fit(strategy, reentrant, steps=30)

    assert strategy.stats.total_updates > 0, "the steps went through the engine"
    assert_same_training_state(plain, plain_trainer, pdasgd, trainer)


@pytest.mark.parametrize("lazy_reads", [True, False], ids=["lazy", "at-start"])
@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_every_recomputation_reads_the_weights_its_forward_read(reentrant: bool, lazy_reads: bool) -> None:
    """Three losses in flight on two backward threads, a bucket per parameter: each recomputation, on a backward
    thread, sees the very weights of its own forward (paired by the batch's storage), and every parameter trains."""
    strategy = PDASGDStrategy(max_in_flight=3, bucket_numel=0, synchronous_warmup=0, lazy_reads=lazy_reads)
    model, trainer = _fit(strategy, reentrant, steps=40)
    layer: _RecordingLinear = model.net[0]

    forward_weights: dict[int, torch.Tensor] = {}
    recomputations = 0
    for on_main, batch, weight in layer.calls:
        if on_main:
            forward_weights[batch] = weight
            continue
        recomputations += 1
        assert torch.equal(weight, forward_weights[batch]), f"recomputation {recomputations} read other weights"
    assert recomputations == trainer.global_step == 40
    assert strategy.stats.total_updates == 40 * len(list(model.parameters()))
    assert all(param.grad is None for param in model.parameters()), "no gradient reached the live parameters"
    assert strategy.stats.total_staleness_max > 0, "the forwards overlapped the backwards"
