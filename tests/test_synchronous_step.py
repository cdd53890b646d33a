"""Fits that need Lightning's own synchronous step get exactly it: manual optimization, TorchScript modules, and hooks
that read or change the whole model's gradient (``gradient_hooks="synchronous"``, the default). ``gradient_hooks="skip"`` keeps the
engine and says which overrides go uncalled."""

from __future__ import annotations

from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lightning_pdasgd import PDASGDStrategy
from tests.helpers import engine_threads, trainer_kwargs
from tests.models import DigitsClassifier, DigitsData


class ManualOneOptimizer(DigitsClassifier):
    """Manual optimization with one optimizer: zero, backward, step, and a scheduler stepped by hand."""

    def __init__(self) -> None:
        super().__init__(optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9))
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        optimizer = self.optimizers()
        loss = self._loss(batch)
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        return loss

    def _loss(self, batch: Any) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.cross_entropy(self(x), y)


class ManualTwoOptimizers(ManualOneOptimizer):
    """The GAN pattern: two optimizers over two parts of the model, stepped alternately, one every other batch."""

    def configure_optimizers(self) -> Any:
        first, last = self.net[0], self.net[-1]
        return torch.optim.SGD(first.parameters(), lr=0.1), torch.optim.Adam(last.parameters(), lr=1e-2)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        optimizer = self.optimizers()[batch_idx % 2]
        loss = self._loss(batch)
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        return loss


class NormClipping(DigitsClassifier):
    """Changes the whole model's gradient before the step, and counts both hooks' calls."""

    def __init__(self) -> None:
        super().__init__(optimizer=lambda p: torch.optim.SGD(p, lr=0.5))
        self.calls = {"on_after_backward": 0, "configure_gradient_clipping": 0}

    def on_after_backward(self) -> None:
        self.calls["on_after_backward"] += 1

    def configure_gradient_clipping(self, optimizer: Any, gradient_clip_val: Any = None,
                                    gradient_clip_algorithm: Any = None) -> None:
        self.calls["configure_gradient_clipping"] += 1
        torch.nn.utils.clip_grad_norm_(self.parameters(), 0.05)


class CountsOptimizerSteps(Callback):
    def __init__(self) -> None:
        self.calls = 0

    def on_before_optimizer_step(self, *args: Any) -> None:
        self.calls += 1


def _fit(model: DigitsClassifier, strategy: Any, steps: int = 12, **overrides: Any) -> L.Trainer:
    trainer = L.Trainer(strategy=strategy, max_steps=steps, limit_val_batches=0, **trainer_kwargs(**overrides))
    trainer.fit(model, DigitsData(batch_size=32))
    return trainer


def _seeded(model_type: type[DigitsClassifier]) -> DigitsClassifier:
    L.seed_everything(0)
    return model_type()


def _assert_same_weights(first: torch.nn.Module, second: torch.nn.Module) -> None:
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name


class EngineThreadsDuringFit(Callback):
    """The engine threads alive at every batch: none when Lightning's own step runs."""

    def __init__(self) -> None:
        self.seen: set[str] = set()

    def on_train_batch_end(self, *args: Any) -> None:
        self.seen.update(thread.name for thread in engine_threads())


@pytest.mark.parametrize("model_type", [ManualOneOptimizer, ManualTwoOptimizers], ids=["one-optimizer", "two"])
def test_manual_optimization_is_lightnings_own_step(model_type: type[DigitsClassifier]) -> None:
    plain = _seeded(model_type)
    plain_trainer = _fit(plain, "auto")
    threads = EngineThreadsDuringFit()
    pdasgd = _seeded(model_type)
    with pytest.warns(UserWarning, match="synchronous step: this LightningModule uses manual optimization"):
        trainer = _fit(pdasgd, "pdasgd", callbacks=[threads])
    assert trainer.global_step == plain_trainer.global_step > 0
    assert threads.seen == set(), threads.seen
    _assert_same_weights(plain, pdasgd)
    for plain_optimizer, optimizer in zip(plain_trainer.optimizers, trainer.optimizers):
        assert str(plain_optimizer.state_dict()) == str(optimizer.state_dict())


def test_manual_optimization_without_optimizer_trains_nothing_like_plain() -> None:
    class NoOptimizer(ManualOneOptimizer):
        def configure_optimizers(self) -> Any:
            return None

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self._loss(batch)

    model = _seeded(NoOptimizer)
    before = {key: value.detach().clone() for key, value in model.named_parameters()}
    trainer = L.Trainer(strategy="pdasgd", max_epochs=1, limit_train_batches=3, limit_val_batches=0,
                        **trainer_kwargs())
    trainer.fit(model, DigitsData(batch_size=32))  # no optimizer step: the epoch, not max_steps, ends the fit
    assert trainer.fit_loop.epoch_loop.batch_progress.total.completed == 3
    assert all(torch.equal(before[key], value) for key, value in model.named_parameters())


def test_gradient_hooks_run_in_lightnings_own_step_by_default() -> None:
    plain, plain_counter = _seeded(NormClipping), CountsOptimizerSteps()
    _fit(plain, "auto", callbacks=[plain_counter])
    pdasgd, counter = _seeded(NormClipping), CountsOptimizerSteps()
    with pytest.warns(UserWarning, match=r"NormClipping\.on_after_backward.*NormClipping\.configure_gradient_clipping"
                                         r".*CountsOptimizerSteps\.on_before_optimizer_step.*gradient_hooks='skip'"):
        _fit(pdasgd, "pdasgd", callbacks=[counter])
    assert pdasgd.calls == plain.calls == {"on_after_backward": 12, "configure_gradient_clipping": 12}
    assert counter.calls == plain_counter.calls == 12
    _assert_same_weights(plain, pdasgd)


def test_gradient_hooks_skip_trains_asynchronously_without_them() -> None:
    model, counter, threads = _seeded(NormClipping), CountsOptimizerSteps(), EngineThreadsDuringFit()
    with pytest.warns(UserWarning, match=r"not called \(`gradient_hooks='skip'`\).*NormClipping\.on_after_backward"):
        trainer = _fit(model, PDASGDStrategy(gradient_hooks="skip"), callbacks=[counter, threads])
    assert model.calls == {"on_after_backward": 0, "configure_gradient_clipping": 0} and counter.calls == 0
    assert any(name.startswith("pdasgd-backward") for name in threads.seen), threads.seen
    assert trainer.strategy.stats.total_updates > 0


def test_gradient_hooks_setting_is_validated() -> None:
    with pytest.raises(ValueError, match="`gradient_hooks` must be one of"):
        PDASGDStrategy(gradient_hooks="ignore")  # type: ignore[arg-type]


def test_manual_optimization_on_several_devices_is_refused_by_name() -> None:
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    from lightning_pdasgd.integration.setup_checks import check_trainer_settings

    trainer = L.Trainer(strategy="pdasgd", **trainer_kwargs(devices=2))
    model = ManualOneOptimizer()
    with pytest.raises(MisconfigurationException, match=r"manual optimization .* one device only.*strategy='ddp'"):
        check_trainer_settings(trainer, model, [torch.optim.SGD(model.parameters(), lr=0.1)])


def test_a_gradient_hook_set_on_a_callback_instance_counts_as_an_override() -> None:
    from lightning.pytorch.callbacks import LambdaCallback

    calls: list[int] = []
    hook = LambdaCallback(on_after_backward=lambda trainer, module: calls.append(trainer.global_step))
    with pytest.warns(UserWarning, match=r"LambdaCallback\.on_after_backward"):
        _fit(_seeded(DigitsClassifier), "pdasgd", steps=4, callbacks=[hook])
    assert calls == [0, 1, 2, 3]


def test_a_fit_that_needs_lightnings_step_logs_only_what_plain_lightning_logs() -> None:
    model = _seeded(NormClipping)
    with pytest.warns(UserWarning, match="synchronous step"):
        trainer = _fit(model, "pdasgd", steps=4, log_every_n_steps=1)
    assert not [key for key in trainer.callback_metrics if key.startswith("pdasgd/")], trainer.callback_metrics


def test_automatic_optimization_without_optimizer_is_lightnings_step() -> None:
    """``configure_optimizers`` returning None: Lightning runs every step and updates nothing; so does PD-ASGD."""

    class NoOptimizer(DigitsClassifier):
        def configure_optimizers(self) -> Any:
            return None

    model = _seeded(NoOptimizer)
    before = {key: value.detach().clone() for key, value in model.named_parameters()}
    with pytest.warns(UserWarning, match="returned no optimizer, so there is nothing to update"):
        trainer = L.Trainer(strategy="pdasgd", max_epochs=1, limit_train_batches=3, limit_val_batches=0,
                            **trainer_kwargs())
        trainer.fit(model, DigitsData(batch_size=32))
    assert trainer.fit_loop.epoch_loop.batch_progress.total.completed == 3
    assert all(torch.equal(before[key], value) for key, value in model.named_parameters())


class ScriptedFirstLayer(DigitsClassifier):
    """The digits classifier whose first layer is a TorchScript module (scripted or traced)."""

    def __init__(self, trace: bool = False) -> None:
        super().__init__(optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9))
        first = torch.nn.Linear(64, 64)
        first = torch.jit.trace(first, torch.zeros(2, 64)) if trace else torch.jit.script(first)
        self.net = torch.nn.Sequential(first, torch.nn.ReLU(), torch.nn.Linear(64, 10))


@pytest.mark.parametrize("trace", [False, True], ids=["script", "trace"])
def test_a_torchscript_module_trains_in_lightnings_own_step(trace: bool) -> None:
    """TorchScript reads its parameters where the engine cannot point them at a forward's weights (the engine's
    hooks and parameter checks used to crash on it): the fit runs Lightning's own step, says why, and trains bit for
    bit as plain Lightning."""
    L.seed_everything(0)
    plain = ScriptedFirstLayer(trace)
    plain_trainer = _fit(plain, "auto")
    L.seed_everything(0)
    pdasgd, threads = ScriptedFirstLayer(trace), EngineThreadsDuringFit()
    with pytest.warns(UserWarning, match=r"synchronous step: TorchScript modules \(net\.0\)"):
        trainer = _fit(pdasgd, "pdasgd", callbacks=[threads])
    assert trainer.global_step == plain_trainer.global_step == 12
    assert threads.seen == set(), threads.seen
    _assert_same_weights(plain, pdasgd)
