"""Shapes from Lightning's own test suite that failed with ``strategy="pdasgd"``, rebuilt as small tests of ours.

Each test provokes the situation Lightning's tests create (a world size set by hand, an optimizer whose ``step``
requires its closure, tuner runs that fail, a patched ``time.perf_counter``), not their assertions.
"""

from __future__ import annotations

import copy
import io
import threading
from typing import Any
from unittest import mock

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, LearningRateFinder, ThroughputMonitor
from lightning.pytorch.tuner import Tuner
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_pdasgd import PDASGDStrategy
from lightning_pdasgd.engine.bucket_optimizer import closure_arguments
from tests.helpers import trainer_kwargs

CPU_OOM = "DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes (simulated)"


def pdasgd_threads() -> list[str]:
    return [thread.name for thread in threading.enumerate() if thread.name.startswith("pdasgd-")]


class TinyModule(L.LightningModule):
    """A linear regression on fixed random data; ``batch_size`` and ``lr`` are attributes the tuners change."""

    def __init__(self, batch_size: int = 4, lr: float = 0.05, samples: int = 64) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.lr = lr
        self.layer = nn.Linear(8, 1)
        generator = torch.Generator().manual_seed(0)
        inputs, targets = torch.randn(samples, 8, generator=generator), torch.randn(samples, 1, generator=generator)
        self.data = TensorDataset(inputs, targets)
        self.most_engine_threads = 0

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        self.most_engine_threads = max(self.most_engine_threads, len(pdasgd_threads()))
        x, y = batch
        return nn.functional.mse_loss(self.layer(x), y)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=self.batch_size)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


# ------------------------------------------------------------------------------------- 1. `strategy.world_size = n`
class SkippingModule(TinyModule):
    def training_step(self, batch: Any, batch_idx: int) -> Any:
        return None  # Lightning refuses a skipped step only when the run is distributed


@pytest.mark.parametrize("world_size", [1, 2])
def test_world_size_set_by_hand_is_what_the_trainer_sees(world_size: int) -> None:
    trainer = L.Trainer(strategy="pdasgd", max_steps=2, barebones=True, accelerator="cpu", devices=1)
    trainer.strategy.world_size = world_size
    assert trainer.world_size == world_size
    if world_size == 1:
        trainer.fit(SkippingModule())
        assert trainer.global_step == 2
    else:
        with pytest.raises(RuntimeError, match="Skipping the `training_step`"):
            trainer.fit(SkippingModule())
    assert trainer.strategy.process_count == 1  # the engine ran on this one process: no process group, no claiming
    assert not torch.distributed.is_initialized()
    assert pdasgd_threads() == []


def test_world_size_set_by_hand_trains_on_one_process() -> None:
    trainer = L.Trainer(strategy="pdasgd", max_steps=3, **trainer_kwargs())
    trainer.strategy.world_size = 2
    model = TinyModule()
    trainer.fit(model)
    assert trainer.global_step == 3
    assert model.most_engine_threads == trainer.strategy.backward_threads
    assert trainer.strategy.reduce_boolean_decision(True, all=True) is True  # no other rank to outvote it


def test_world_size_set_by_hand_must_match_a_multi_process_run() -> None:
    from lightning.fabric.plugins.environments import LightningEnvironment

    devices = [torch.device("cpu"), torch.device("cpu")]
    strategy = PDASGDStrategy(parallel_devices=devices, cluster_environment=LightningEnvironment())
    with pytest.raises(ValueError, match="world_size"):
        strategy.world_size = 0
    strategy.world_size = 3
    strategy.set_world_ranks()
    assert strategy.process_count == 2
    with pytest.raises(MisconfigurationException, match=r"`strategy.world_size` was set to 3.*2 processes"):
        strategy._check_world_size_set()
    strategy.world_size = 2
    strategy._check_world_size_set()


def test_no_logging_trainer_trains() -> None:
    """``log_every_n_steps=0`` (what ``barebones=True`` sets) writes no logs; the engine's metrics must not divide by
    it."""
    trainer = L.Trainer(strategy="pdasgd", max_steps=3, **trainer_kwargs(log_every_n_steps=0))
    trainer.fit(TinyModule())
    assert trainer.global_step == 3


# ------------------------------------------------------------------------------------- 2. `def step(self, closure)`
class ClosureRequiredAdamW(torch.optim.AdamW):
    """The third-party pattern: ``step`` takes the closure with no default and runs under ``no_grad``."""

    calls = 0

    @torch.no_grad()
    def step(self, closure: Any) -> Any:  # type: ignore[override]
        ClosureRequiredAdamW.calls += 1
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        super().step()
        return loss


class KeywordClosureAdamW(torch.optim.AdamW):
    @torch.no_grad()
    def step(self, *, closure: Any) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        super().step()
        return loss


class AdamWModule(TinyModule):
    def __init__(self, optimizer_class: type) -> None:
        super().__init__()
        self.optimizer_class = optimizer_class

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        assert torch.is_grad_enabled()
        return super().training_step(batch, batch_idx)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer_class(self.parameters(), lr=0.01)


def _fit_adamw(strategy: Any, optimizer_class: type) -> nn.Module:
    L.seed_everything(7)
    model = AdamWModule(optimizer_class)
    L.Trainer(strategy=strategy, max_steps=6, **trainer_kwargs()).fit(model)
    return model.layer


@pytest.mark.parametrize("optimizer_class", [ClosureRequiredAdamW, KeywordClosureAdamW])
def test_optimizer_whose_step_requires_the_closure_matches_plain(optimizer_class: type) -> None:
    plain = _fit_adamw("auto", optimizer_class)
    ClosureRequiredAdamW.calls = 0
    pdasgd = _fit_adamw(PDASGDStrategy(max_in_flight=1), optimizer_class)
    if optimizer_class is ClosureRequiredAdamW:
        assert ClosureRequiredAdamW.calls == 6  # the subclass's own step applied every update (one bucket)
    for mine, theirs in zip(pdasgd.parameters(), plain.parameters()):
        torch.testing.assert_close(mine, theirs)


def test_closure_arguments_follow_the_signature() -> None:
    class NoClosure(torch.optim.SGD):
        def step(self) -> None:  # type: ignore[override]
            super().step()

    assert closure_arguments(torch.optim.SGD) == ((), ())
    assert closure_arguments(NoClosure) == ((), ())
    assert closure_arguments(ClosureRequiredAdamW) == ((None,), ())
    assert closure_arguments(KeywordClosureAdamW) == ((), (("closure", None),))


# ------------------------------------------------------------------------------------- 3. tuner runs that fail
class OutOfMemoryAbove(TinyModule):
    """Raises the CPU allocator's out-of-memory error for batches above ``limit``, as a real one would."""

    def __init__(self, limit: int = 8) -> None:
        super().__init__(batch_size=2)
        self.limit = limit

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        if batch[0].shape[0] > self.limit:
            raise RuntimeError(CPU_OOM)
        return super().training_step(batch, batch_idx)


def test_scale_batch_size_with_out_of_memory_trials_leaves_no_thread(tmp_path: Any) -> None:
    """The tuner catches each out-of-memory trial and runs the fit loop again: no trial's engine may stay."""
    trainer = L.Trainer(strategy="pdasgd", max_epochs=1, default_root_dir=tmp_path, **trainer_kwargs())
    model = OutOfMemoryAbove(limit=8)
    size = Tuner(trainer).scale_batch_size(model, mode="binsearch", max_trials=6, steps_per_trial=2)
    assert size is not None and size <= 8
    assert model.most_engine_threads == trainer.strategy.backward_threads  # one engine at a time
    assert pdasgd_threads() == []


class DataloaderFailsAbove(TinyModule):
    def train_dataloader(self) -> DataLoader:
        if self.batch_size > 8:
            raise ValueError(f"no dataloader for batch_size={self.batch_size}")
        return super().train_dataloader()


def test_scale_batch_size_whose_dataloader_fails_leaves_no_thread(tmp_path: Any) -> None:
    trainer = L.Trainer(strategy="pdasgd", max_epochs=1, default_root_dir=tmp_path, **trainer_kwargs())
    with pytest.raises(ValueError, match="no dataloader for batch_size=16"):
        Tuner(trainer).scale_batch_size(DataloaderFailsAbove(), mode="power", max_trials=6, steps_per_trial=2)
    assert pdasgd_threads() == []


class FailsAtStep(TinyModule):
    def training_step(self, batch: Any, batch_idx: int) -> Any:
        if batch_idx == 3:
            raise ValueError("step 3 failed")
        return super().training_step(batch, batch_idx)


def test_lr_find_whose_run_raises_leaves_no_thread(tmp_path: Any) -> None:
    trainer = L.Trainer(strategy="pdasgd", max_epochs=1, default_root_dir=tmp_path, **trainer_kwargs())
    with pytest.raises(ValueError, match="step 3 failed"):
        Tuner(trainer).lr_find(FailsAtStep(), num_training=8)
    assert pdasgd_threads() == []


class LearningRateFinderEachEpoch(LearningRateFinder):
    """Runs the LR finder at the start of chosen epochs, inside the fit loop's own run."""

    def __init__(self, epochs: tuple[int, ...]) -> None:
        super().__init__(num_training_steps=4, early_stop_threshold=None)
        self.epochs = epochs

    def on_fit_start(self, *args: Any, **kwargs: Any) -> None:
        return

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch in self.epochs:
            self.lr_find(trainer, pl_module)


class EngineSeen(Callback):
    """Records, for each epoch, whether its batches ran on the engine."""

    def __init__(self) -> None:
        self.on_engine: dict[int, bool] = {}

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self.on_engine[trainer.current_epoch] = trainer.strategy.engine is not None


def test_lr_find_inside_a_running_fit_leaves_no_thread(tmp_path: Any) -> None:
    seen = EngineSeen()
    model = TinyModule()
    trainer = L.Trainer(
        strategy="pdasgd",
        max_epochs=3,
        limit_train_batches=6,
        default_root_dir=tmp_path,
        callbacks=[LearningRateFinderEachEpoch(epochs=(0, 2)), seen],
        **trainer_kwargs(),
    )
    trainer.fit(model)
    assert trainer.current_epoch == 3
    assert seen.on_engine == {0: True, 1: True, 2: True}  # after each inner run, the outer one trains on the engine
    assert model.most_engine_threads == trainer.strategy.backward_threads
    assert pdasgd_threads() == []


# ------------------------------------------------------------------------------------- 4. StopIteration, patched clock
class StopIterationInBackward(torch.autograd.Function):
    """Identity; its backward raises StopIteration (an exhausted iterator in a hook) on a chosen call."""

    calls = 0

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        StopIterationInBackward.calls += 1
        if StopIterationInBackward.calls == 2:
            raise StopIteration
        return grad


class StopsInBackward(TinyModule):
    def training_step(self, batch: Any, batch_idx: int) -> Any:
        x, y = batch
        return nn.functional.mse_loss(StopIterationInBackward.apply(self.layer(x)), y)


class EpochBound(Callback):
    """Fails the fit when it starts more epochs than it should: an endless loop of empty epochs ends here."""

    def __init__(self, most: int) -> None:
        self.most = most

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        assert trainer.current_epoch < self.most, f"epoch {trainer.current_epoch} started: epochs end without steps"


@pytest.mark.timeout(120)
def test_stop_iteration_from_the_engine_is_an_error_not_the_end_of_the_data() -> None:
    StopIterationInBackward.calls = 0
    trainer = L.Trainer(strategy="pdasgd", max_steps=12, callbacks=[EpochBound(3)], **trainer_kwargs())
    with pytest.raises(RuntimeError, match="StopIteration was raised inside the engine") as raised:
        trainer.fit(StopsInBackward())
    assert isinstance(raised.value.__cause__, StopIteration)
    assert pdasgd_threads() == []


class IteratorStep(TinyModule):
    """Takes its batches from ``dataloader_iter``: the StopIteration of ``next`` at the end is Lightning's signal."""

    def __init__(self) -> None:
        super().__init__()
        self.steps = 0

    def training_step(self, dataloader_iter: Any) -> Any:  # type: ignore[override]
        batch, _, _ = next(dataloader_iter)
        self.steps += 1
        return super().training_step(batch, self.steps - 1)


def test_stop_iteration_of_the_step_still_ends_the_epoch() -> None:
    model = IteratorStep()
    trainer = L.Trainer(strategy="pdasgd", max_epochs=2, callbacks=[EpochBound(2)], **trainer_kwargs())
    trainer.fit(model)
    assert (model.steps, trainer.global_step, trainer.current_epoch) == (32, 32, 2)  # 64 samples, batches of 4


def _throughput_metrics(strategy: Any, tmp_path: Any) -> list[Any]:
    """What a real ThroughputMonitor logs with ``time.perf_counter`` patched to a fixed, finite list of times."""
    logger = mock.Mock(save_dir=str(tmp_path))
    monitor = ThroughputMonitor(batch_size_fn=lambda batch: 4, window_size=2)
    model = TinyModule()
    model.flops_per_batch = 100
    trainer = L.Trainer(
        strategy=strategy,
        max_steps=4,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[monitor, EpochBound(2)],
        **trainer_kwargs(logger=logger, log_every_n_steps=1),
    )
    times = [0.0, 1.0, 3.0, 4.0, 6.0]  # the monitor's start and one reading per step: nothing to spare
    with mock.patch("lightning.pytorch.callbacks.throughput_monitor.get_available_flops", return_value=1000):
        with mock.patch("time.perf_counter", side_effect=times):
            trainer.fit(model)
    assert trainer.global_step == 4
    return [
        {key: value for key, value in recorded.kwargs["metrics"].items() if not key.startswith("pdasgd/")}
        for recorded in logger.log_metrics.mock_calls
        if any(key.startswith("train/") for key in recorded.kwargs["metrics"])
    ]


@pytest.mark.timeout(120)
def test_throughput_monitor_with_a_patched_clock_logs_what_plain_lightning_logs(tmp_path: Any) -> None:
    plain = _throughput_metrics("auto", tmp_path / "plain")
    pdasgd = _throughput_metrics("pdasgd", tmp_path / "pdasgd")
    assert len(plain) == 4
    assert pdasgd == plain


class CopiesItsNetwork(L.LightningModule):
    """Deep-copies and pickles its network inside ``training_step`` (an EMA of the weights, a snapshot per step:
    Lightning's ``test_model_checkpoint_manual_opt`` does it)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
        self.copies: list[nn.Module] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.copies.append(copy.deepcopy(self.net))
        buffer = io.BytesIO()
        torch.save(self.net, buffer)
        buffer.seek(0)
        self.copies.append(torch.load(buffer, weights_only=False))
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("strategy", [PDASGDStrategy(), PDASGDStrategy(max_in_flight=1)], ids=["default", "exact"])
def test_module_copied_or_pickled_during_the_step_is_a_plain_module(strategy: PDASGDStrategy) -> None:
    data = TensorDataset(torch.randn(32, 8), torch.randint(0, 2, (32,)))
    model = CopiesItsNetwork()
    L.Trainer(strategy=strategy, max_steps=4, **trainer_kwargs()).fit(model, DataLoader(data, batch_size=8))
    assert len(model.copies) == 8
    for network in model.copies:  # the engine's pre-hooks are not copied: the copy runs on its own weights
        assert network(torch.randn(3, 8)).shape == (3, 2)
        assert all(p.data_ptr() not in {q.data_ptr() for q in model.parameters()} for p in network.parameters())


class TwoBackwardsPerStep(L.LightningModule):
    """Manual optimization whose closure backpropagates twice (Lightning's ``test_step_with_optimizer_closure``)."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.layer = nn.Linear(8, 2)

    def training_step(self, batch: Any, batch_idx: int) -> None:
        optimizer = self.optimizers()

        def closure() -> None:
            for retain in (True, False):
                self.manual_backward(nn.functional.cross_entropy(self.layer(batch[0]), batch[1]), retain_graph=retain)

        optimizer.step(closure=closure)
        optimizer.zero_grad()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize(("model_type", "per_step"), [(TwoBackwardsPerStep, 2), (None, 1)], ids=["manual", "engine"])
def test_strategy_backward_is_lightnings_and_counts_every_loss(model_type: Any, per_step: int) -> None:
    """Lightning's tests wrap the base ``Strategy.backward`` in a mock around the strategy's own method and count its
    calls: the strategy keeps Lightning's method (no recursion through an override), and the engine's hand-off
    happens below it, so every loss is counted as in plain Lightning."""
    from lightning.pytorch.strategies import Strategy

    from tests.models import DigitsClassifier, DigitsData

    model = model_type() if model_type is not None else DigitsClassifier()
    loader = DataLoader(TensorDataset(torch.randn(32, 8), torch.randint(0, 2, (32,))), batch_size=8)
    trainer = L.Trainer(strategy="pdasgd", max_epochs=1, limit_train_batches=4, **trainer_kwargs())
    with mock.patch.object(Strategy, "backward", wraps=trainer.strategy.backward) as backward:
        if model_type is None:
            trainer.fit(model, DigitsData(batch_size=32))
        else:
            trainer.fit(model, loader)
    assert backward.call_count == 4 * per_step
    assert trainer.strategy.stats.total_updates > 0 or model_type is not None


def test_tensor_backward_is_what_the_engine_calls() -> None:
    """Lightning's ``test_backward_count_simple`` patches ``torch.Tensor.backward`` and counts one call per step; the
    engine's backward threads call it too (and a mock that computes no gradient ends the fit normally)."""
    from lightning.pytorch.demos.boring_classes import BoringModel

    callers: list[str] = []

    def record_caller(*args: Any, **kwargs: Any) -> None:
        callers.append(threading.current_thread().name)

    with mock.patch("torch.Tensor.backward", side_effect=record_caller) as tensor_backward:
        L.Trainer(strategy=PDASGDStrategy(synchronous_warmup=0), max_steps=5, **trainer_kwargs()).fit(BoringModel())
    assert tensor_backward.call_count == 5
    assert all(name.startswith("pdasgd-") for name in callers), callers  # through the engine's backward threads


def test_backbone_frozen_at_the_start_and_unfrozen_by_the_first_epoch_trains() -> None:
    """Lightning's fine-tuning recipe where the optimizer holds only the backbone, frozen before training and
    unfrozen when the first epoch starts: the engine starts at the first step, when there is something to train."""
    from lightning.pytorch.callbacks import BackboneFinetuning

    class UnfreezeAtOnce(BackboneFinetuning):
        def finetune_function(self, pl_module: Any, epoch: int, optimizer: Any) -> None:
            if epoch == 0:
                self.unfreeze_and_add_param_group(pl_module.backbone, optimizer, 0.1, train_bn=self.train_bn)

    class BackboneOnly(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = nn.Linear(8, 2, bias=False)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return nn.functional.cross_entropy(self.backbone(batch[0]), batch[1])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    model = BackboneOnly()
    before = model.backbone.weight.detach().clone()
    data = DataLoader(TensorDataset(torch.randn(32, 8), torch.randint(0, 2, (32,))), batch_size=8)
    trainer = L.Trainer(strategy="pdasgd", max_epochs=1, callbacks=[UnfreezeAtOnce()], **trainer_kwargs())
    with pytest.warns(UserWarning, match="Did you init your optimizer in"):  # Lightning's own advice, as in plain
        trainer.fit(model, data)
    assert not torch.equal(before, model.backbone.weight) and trainer.strategy.stats.total_updates > 0


def test_the_trainers_callback_list_is_the_users_after_fit_and_tuning(tmp_path: Any) -> None:
    """The strategy's own callback (``EngineDrain``) exists only while a fit runs: Lightning's tuner tests compare
    the Trainer's attributes before and after tuning, and ``configure_callbacks`` tests its list after fit."""
    from tests.models import DigitsClassifier, DigitsData

    trainer = L.Trainer(strategy="pdasgd", max_epochs=1, limit_train_batches=4, default_root_dir=tmp_path,
                        **trainer_kwargs())
    before = list(trainer.callbacks)
    trainer.fit(DigitsClassifier(), DigitsData(batch_size=32))
    assert trainer.callbacks == before
    model = DigitsClassifier()
    model.lr = 0.1
    Tuner(trainer).lr_find(model, DigitsData(batch_size=32), num_training=5)
    assert trainer.callbacks == before
