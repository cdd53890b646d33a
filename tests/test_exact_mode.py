"""``max_in_flight=1`` on one device is Lightning's own synchronous step: exact by construction, no engine thread.

The suite runs ``max_in_flight=1`` through the engine to prove the engine's exactness (``conftest.py``); these tests
remove that gate and check what users get.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import pytest

from lightning_pdasgd import PDASGDStrategy
from lightning_pdasgd.engine import thread_control
from lightning_pdasgd.engine.autotune import Candidate
from lightning_pdasgd.engine.thread_control import ENGINE_AT_ONE_IN_FLIGHT
from tests.helpers import (
    DIGITS_OPTIMIZERS,
    assert_same_training_state,
    engine_on_lightnings_path,
    engine_threads,
    fit_digits,
)

pytestmark = pytest.mark.usefixtures("users_exact_mode")  # what users get (`tests/conftest.py`)


class _NoEngineThread(L.Callback):
    """Records, after every batch, whether any engine thread was alive."""

    def __init__(self) -> None:
        self.alive: list[int] = []

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self.alive.append(len(engine_threads()))


@pytest.mark.parametrize("optimizer", sorted(DIGITS_OPTIMIZERS))
def test_one_loss_in_flight_is_lightnings_own_step_bitwise(optimizer: str) -> None:
    plain, plain_trainer = fit_digits("auto", optimizer)
    strategy = PDASGDStrategy(max_in_flight=1)
    pdasgd, trainer = fit_digits(strategy, optimizer)

    assert trainer.global_step == plain_trainer.global_step == 40
    assert_same_training_state(plain, plain_trainer, pdasgd, trainer)
    assert strategy.stats.total_updates == 0, "no update went through the engine"


def test_one_loss_in_flight_starts_no_engine_thread() -> None:
    watcher = _NoEngineThread()
    strategy = PDASGDStrategy(max_in_flight=1)
    model, trainer = fit_digits(strategy, "sgd_momentum_nesterov_wd", steps=5, callbacks=[watcher])
    assert trainer.global_step == 5
    assert watcher.alive == [0] * 5


class _HooksOnModules(L.Callback):
    """Records, after every batch, how many forward pre-hooks the model's modules carry."""

    def __init__(self) -> None:
        self.counts: list[int] = []

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args: Any) -> None:
        self.counts.append(sum(len(submodule._forward_pre_hooks) for submodule in module.modules()))


def test_lightnings_own_step_leaves_no_hook_of_the_engine_on_the_modules() -> None:
    """The exact mode leaves nothing of the engine on the modules' call path (a module with a forward pre-hook
    takes torch's slower call path: about 1.4 us more per call); the engine's steps have the hooks (they read each
    layer when the forward reaches it)."""
    plain_steps, engine_steps = _HooksOnModules(), _HooksOnModules()
    fit_digits(PDASGDStrategy(max_in_flight=1), "sgd_momentum_nesterov_wd", steps=5, callbacks=[plain_steps])
    fit_digits(PDASGDStrategy(synchronous_warmup=0), "sgd_momentum_nesterov_wd", steps=5, callbacks=[engine_steps])
    assert plain_steps.counts == [0] * 5
    assert min(engine_steps.counts) > 0


def test_the_gate_runs_one_loss_in_flight_through_the_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine's own tests depend on this gate: without it they would test Lightning instead."""
    monkeypatch.setenv(ENGINE_AT_ONE_IN_FLIGHT, "1")
    watcher = _NoEngineThread()
    strategy = PDASGDStrategy(max_in_flight=1)
    fit_digits(strategy, "sgd_momentum_nesterov_wd", steps=5, callbacks=[watcher])
    assert min(watcher.alive) >= 1
    assert strategy.stats.total_updates > 0


class _EngineOnTheStepPath(L.Callback):
    """Records, after every batch, whether the engine's drain callback or backward routing is on Lightning's path."""

    def __init__(self) -> None:
        self.seen: list[tuple[bool, bool]] = []

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self.seen.append(engine_on_lightnings_path(trainer))


def test_the_exact_mode_puts_nothing_of_the_engine_on_lightnings_path() -> None:
    """Every callback is called at every batch and the precision plugin's backward on every loss: the exact mode,
    which never runs the engine, installs neither (the engine's modes do); both are gone after the fit."""
    exact, engine = _EngineOnTheStepPath(), _EngineOnTheStepPath()
    _, trainer = fit_digits(PDASGDStrategy(max_in_flight=1), "sgd_momentum_nesterov_wd", steps=5, callbacks=[exact])
    fit_digits(PDASGDStrategy(synchronous_warmup=0), "sgd_momentum_nesterov_wd", steps=5, callbacks=[engine])
    assert exact.seen == [(False, False)] * 5
    assert engine.seen == [(True, True)] * 5
    assert "backward" not in vars(trainer.strategy.precision_plugin)
    assert not any(type(callback).__name__ == "EngineDrain" for callback in trainer.callbacks)


def test_a_warm_up_on_one_device_keeps_only_the_loss_watch_on_lightnings_path() -> None:
    """The synchronous warm-up on one device is Lightning's own step: nothing is in flight between its steps, so the
    drain callback comes in only with the engine's first step; the backward routing stays, for the warm-up and the
    guard watch the losses."""
    seen = _EngineOnTheStepPath()
    fit_digits(PDASGDStrategy(synchronous_warmup=3), "sgd_momentum_nesterov_wd", steps=6, callbacks=[seen])
    assert seen.seen == [(False, True)] * 3 + [(True, True)] * 3


class _ForGood(L.Callback):
    """Records, after every batch, whether the strategy treats its session as Lightning's own step for good."""

    def __init__(self) -> None:
        self.seen: list[bool] = []

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        strategy = trainer.strategy
        self.seen.append(strategy._session is not None and strategy._hooks.aside_for is strategy._session)


def test_an_autotuner_that_settles_on_lightnings_step_trains_as_plain_lightning(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``backward_threads="auto"`` that chooses the plain step (here the only candidate) trains bit for bit as
    plain Lightning with nothing of the engine on Lightning's path (no backward is ever in flight between steps),
    and from its choice on, the strategy's ``training_step`` passes straight on to Lightning's."""
    monkeypatch.setattr(thread_control, "default_candidates", lambda device, allow_synchronous: [Candidate(0, None)])
    plain, plain_trainer = fit_digits("auto", "sgd_momentum_nesterov_wd")
    seen, for_good = _EngineOnTheStepPath(), _ForGood()
    strategy = PDASGDStrategy(backward_threads="auto", autotune_steps=3, synchronous_warmup=0)
    pdasgd, trainer = fit_digits(strategy, "sgd_momentum_nesterov_wd", callbacks=[seen, for_good])

    assert strategy.autotune_report is not None and "chose plain synchronous step" in strategy.autotune_report
    assert seen.seen == [(False, False)] * 40
    assert for_good.seen == [False] * 3 + [True] * 37  # the trial's steps, then the choice
    assert_same_training_state(plain, plain_trainer, pdasgd, trainer)
