"""Activation checkpointing (``torch.utils.checkpoint``): a segment recomputed during the backward, on a backward
thread, reads the weights its forward read (``engine/recomputation.py``).

Before: with ``use_reentrant=True`` the recomputation never ran (the backward was limited to the stash's leaves) and
the checkpointed layers silently never trained; with ``use_reentrant=False`` it read whatever the modules held at
that moment, mostly the next forward's weights.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import pytest
import torch

from lightning_pdasgd import PDASGDStrategy
from tests.helpers import DIGITS_OPTIMIZERS, assert_same_training_state, step_scheduler, trainer_kwargs
from tests.models import CheckpointedDigits, DigitsData, RecordingLinear


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
def test_every_recomputation_reads_the_weights_its_forward_read(
    reentrant: bool, lazy_reads: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """Three losses in flight on two backward threads, a bucket per parameter: each recomputation, on a backward
    thread, sees the very weights of its own forward (paired by the batch's storage), and every parameter trains.
    The engine's check of the parameter set never mistakes a recomputation's leaves for a changed parameter (on
    several devices that rebuild met the other ranks' validation: ``ConsistentPointMismatchError``)."""
    strategy = PDASGDStrategy(max_in_flight=3, bucket_numel=0, synchronous_warmup=0, lazy_reads=lazy_reads)
    with caplog.at_level(logging.DEBUG, logger="lightning_pdasgd.engine.session"):
        model, trainer = _fit(strategy, reentrant, steps=40)
    assert not [record.message for record in caplog.records if "rebuilding" in record.message]
    layer: RecordingLinear = model.net[0]

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


def test_the_drain_before_validation_recomputes_in_training_mode() -> None:
    """Lightning puts the model in eval mode before the validation's drain runs the last backwards: their
    recomputations still run BatchNorm in training mode (else torch's check of the recomputed tensors fails), and
    the validation itself runs in eval mode."""
    L.seed_everything(0)
    model = CheckpointedDigits(False, optimizer=DIGITS_OPTIMIZERS["sgd_momentum_nesterov_wd"])
    trainer = L.Trainer(strategy=PDASGDStrategy(synchronous_warmup=0), max_epochs=2, **trainer_kwargs())
    trainer.fit(model, DigitsData(batch_size=32))
    assert len(model.val_accuracy) == 2 and model.val_accuracy[-1] >= 0.8, model.val_accuracy
