"""The synchronous warm-up: the first optimizer steps of a fit run one loss in flight (exactly plain Lightning's
updates: for users on one device Lightning's own step, otherwise the engine at one loss in flight, which the suite
uses as it does for ``max_in_flight=1``), then the configured asynchrony.

Why (``docs/convergence.md``): the first steps, where the loss falls fastest, are where asynchrony cost the small
BatchNorm CNNs of the paired grid their worst seeds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from lightning_pdasgd import PDASGDStrategy
from lightning_pdasgd.config import SYNCHRONOUS_WARMUP_MAX_STEPS, PDASGDConfig
from lightning_pdasgd.engine.thread_control import ENGINE_AT_ONE_IN_FLIGHT
from tests.helpers import (
    OneStaleGate,
    StaleGate,
    assert_same_training_state,
    engine_threads,
    fit_digits,
    trainer_kwargs,
)
from tests.models import DigitsClassifier, DigitsData


class _Mode(L.Callback):
    """Records, at every batch end, the bound on losses in flight the step ran under."""

    def __init__(self) -> None:
        self.in_flight: list[int] = []
        self.parameters = 0

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        strategy = trainer.strategy
        assert strategy.engine is not None and strategy.engine.running, "the warm-up runs through the engine"
        self.in_flight.append(strategy.max_in_flight)
        self.parameters = strategy.updater.num_parameters


def test_the_warmup_steps_are_plain_lightnings_updates_bitwise() -> None:
    plain, plain_trainer = fit_digits("auto", "sgd_momentum_nesterov_wd", steps=12)
    strategy = PDASGDStrategy(synchronous_warmup=12)
    warmed, trainer = fit_digits(strategy, "sgd_momentum_nesterov_wd", steps=12)

    assert trainer.global_step == plain_trainer.global_step == 12
    assert_same_training_state(plain, plain_trainer, warmed, trainer)
    assert strategy.stats.total_updates > 0, "the updates went through the engine"
    assert strategy.stats.total_staleness_sum == 0


def test_the_engine_takes_over_after_the_warmup_and_trains_asynchronously() -> None:
    mode = _Mode()
    # one bucket: then any overlap makes an update stale (with a bucket per module, lazy reads may read each one fresh)
    strategy = PDASGDStrategy(synchronous_warmup=5, bucket_numel=10**9)
    model, trainer = fit_digits(strategy, "sgd_momentum_nesterov_wd", steps=30, callbacks=[mode])

    assert trainer.global_step == 30
    assert mode.in_flight == [1] * 5 + [2] * 25
    assert strategy.stats.total_updates == 30 * mode.parameters  # each step updated each parameter once
    assert strategy.stats.total_staleness_sum > 0, "two losses in flight after the warm-up"
    assert not engine_threads(), "the engine's threads end with the fit"


def test_warmup_zero_trains_asynchronously_from_the_first_step() -> None:
    mode = _Mode()
    fit_digits(PDASGDStrategy(synchronous_warmup=0), "sgd_momentum_nesterov_wd", steps=4, callbacks=[mode])
    assert mode.in_flight == [2] * 4


def test_a_fraction_warms_up_that_share_of_the_run() -> None:
    mode = _Mode()
    fit_digits(PDASGDStrategy(synchronous_warmup=0.25), "sgd_momentum_nesterov_wd", steps=20, callbacks=[mode])
    assert mode.in_flight == [1] * 5 + [2] * 15


@pytest.mark.parametrize(
    ("warmup", "run_steps", "done", "ranks", "expected"),
    [
        (0.1, 92, 0, 1, (10, 0)),  # a tenth of the run, rounded up
        (0.1, 100_000, 0, 1, (SYNCHRONOUS_WARMUP_MAX_STEPS, 0)),  # at most this many steps
        (0.1, float("inf"), 0, 1, (SYNCHRONOUS_WARMUP_MAX_STEPS, 0)),  # a run of unknown length
        (0.1, 92, 4, 1, (6, 0)),  # a resumed fit has trained some already
        (0.1, 92, 40, 1, (0, 0)),
        (7, 92, 0, 1, (7, 0)),
        (7, float("inf"), 3, 1, (4, 0)),
        (0, 92, 0, 1, (0, 0)),
        (0.0, 92, 0, 1, (0, 0)),
        (0.1, 92, 0, 2, (5, 0)),  # steps count over ranks, as `global_step` does: each rank warms up its share
        (0.1, 92, 4, 4, (2, 0)),
        ("auto", 192, 0, 1, (20, 44)),  # a tenth, and up to a third while the loss has not halved
        ("auto", 192, 0, 2, (10, 22)),
        ("auto", 3_000, 0, 1, (300, 200)),
        ("auto", 100_000, 0, 1, (SYNCHRONOUS_WARMUP_MAX_STEPS, 0)),  # both parts at most this many steps
        ("auto", float("inf"), 0, 1, (SYNCHRONOUS_WARMUP_MAX_STEPS, 0)),
        ("auto", 192, 4, 1, (16, 0)),  # a resumed run's loss no longer starts where the run did: no extension
    ],
)
def test_warmup_steps_from_the_setting(
    warmup: Any, run_steps: float, done: int, ranks: int, expected: tuple[int, int]
) -> None:
    assert PDASGDConfig.from_arguments(synchronous_warmup=warmup).warmup_steps(run_steps, done, ranks) == expected


def test_the_default_warms_up_until_the_loss_has_halved() -> None:
    assert PDASGDStrategy().config.synchronous_warmup == "auto"


class _LossShapedBy(DigitsClassifier):
    """A model that does not learn (lr 0) and returns ``shape(loss, step)``: the test decides when the loss has
    fallen from where it began."""

    def __init__(self, shape: Any) -> None:
        super().__init__(optimizer=lambda params: torch.optim.SGD(params, lr=0.0, momentum=0.9))
        self.shape = shape

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.shape(super().training_step(batch, batch_idx), self.trainer.global_step)


def _auto_warmup_steps(shape: Any, steps: int = 100) -> int:
    """How many steps of a ``synchronous_warmup="auto"`` fit ran one loss in flight (checked to be its first ones)."""
    mode = _Mode()
    L.seed_everything(0)
    trainer = L.Trainer(strategy=PDASGDStrategy(), max_steps=steps, limit_val_batches=0,
                        callbacks=[mode], **trainer_kwargs())
    trainer.fit(_LossShapedBy(shape), DigitsData(batch_size=32))
    synchronous = mode.in_flight.count(1)
    assert mode.in_flight == [1] * synchronous + [2] * (steps - synchronous), mode.in_flight
    return synchronous


@pytest.mark.parametrize("engine_at_one", [True, False], ids=["engine-at-one-in-flight", "lightnings-own-step"])
def test_auto_warms_up_past_a_tenth_while_the_loss_has_not_halved_and_ends_when_it_has(
    engine_at_one: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """100 steps: a tenth is 10, a third 34. Both ways a warm-up step runs (several devices: the engine at one loss
    in flight; one device: Lightning's own step) must see the losses."""
    if not engine_at_one:
        monkeypatch.delenv(ENGINE_AT_ONE_IN_FLIGHT, raising=False)
    assert _auto_warmup_steps(lambda loss, step: loss) == 34, "a loss that never halves: up to a third of the run"
    assert _auto_warmup_steps(lambda loss, step: loss * (1.0 if step < 5 else 0.05)) == 10, "halved in the tenth"
    ended = _auto_warmup_steps(lambda loss, step: loss * (1.0 if step < 15 else 0.05))
    assert 15 < ended < 34, f"past the tenth until the loss has halved, then the engine: {ended} steps"
    assert _auto_warmup_steps(lambda loss, step: loss - 10.0) == 10, "a loss without a scale (<= 0): the tenth"


@pytest.mark.parametrize("bad", [-1, 1.0, 1.5, -0.1, True, "10", None])
def test_a_bad_warmup_is_refused_naming_the_setting(bad: Any) -> None:
    with pytest.raises(ValueError, match="synchronous_warmup"):
        PDASGDStrategy(synchronous_warmup=bad)


def test_a_resumed_fit_warms_up_only_the_steps_it_has_not_trained(tmp_path: Path) -> None:
    L.seed_everything(0)
    first = L.Trainer(strategy=PDASGDStrategy(synchronous_warmup=6), max_steps=4, limit_val_batches=0,
                      **trainer_kwargs())
    first.fit(DigitsClassifier(), DigitsData(batch_size=32))
    checkpoint = tmp_path / "step4.ckpt"
    first.save_checkpoint(checkpoint)

    mode = _Mode()
    resumed = L.Trainer(strategy=PDASGDStrategy(synchronous_warmup=6), max_steps=10, limit_val_batches=0,
                        callbacks=[mode], **trainer_kwargs())
    resumed.fit(DigitsClassifier(), DigitsData(batch_size=32), ckpt_path=checkpoint)
    assert resumed.global_step == 10
    assert mode.in_flight == [1] * 2 + [2] * 4


class _GatedDigits(DigitsClassifier):
    """Each backward of steps ``GATED`` waits until the next forward ran: two losses in flight there, on any machine
    (without the gate, a fast backward could apply each update before the next forward read the weights)."""

    GATED = range(5, 11)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.gate = StaleGate()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        if batch_idx in self.GATED:
            loss = OneStaleGate.apply(loss, self.gate, batch_idx)
        self.gate.forward_ran(batch_idx)
        return loss


class _PlainOrEngine(L.Callback):
    """Records, at every batch end, whether the step was Lightning's own and how many updates the engine made."""

    def __init__(self) -> None:
        self.steps: list[tuple[bool, int]] = []

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        strategy = trainer.strategy
        self.steps.append((strategy._session.threads.plain_steps, strategy.stats.total_updates))


@pytest.mark.usefixtures("users_exact_mode")  # what users get: one loss in flight is Lightning's own step
def test_one_device_warms_up_with_lightnings_own_step_then_the_engine_takes_over() -> None:
    """Lightning's own step is as exact as the engine at one loss in flight and runs at plain Lightning's speed
    (the engine at one in flight: 0.54-0.66x on the MLPs of ``benchmarks.engine_overhead``)."""
    plain, plain_trainer = fit_digits("auto", "sgd_momentum_nesterov_wd", steps=8)
    warmed, trainer = fit_digits(PDASGDStrategy(synchronous_warmup=8), "sgd_momentum_nesterov_wd", steps=8)
    assert_same_training_state(plain, plain_trainer, warmed, trainer)

    watch = _PlainOrEngine()
    strategy = PDASGDStrategy(synchronous_warmup=5, bucket_numel=10**9)  # one bucket: any overlap is staleness
    fit_digits(strategy, "sgd_momentum_nesterov_wd", steps=12, callbacks=[watch], model_class=_GatedDigits)
    assert watch.steps[:5] == [(True, 0)] * 5, watch.steps
    assert not any(plain for plain, _ in watch.steps[5:]) and watch.steps[-1][1] > 0, watch.steps
    assert strategy.stats.total_staleness_sum > 0, "two losses in flight after the warm-up"
