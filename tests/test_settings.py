"""Registration, constructor validation, and every setting PD-ASGD refuses, with the error naming it."""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import StrategyRegistry
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_pdasgd import PDASGDStrategy
from tests.helpers import engine_threads, trainer_kwargs
from tests.models import DigitsClassifier, DigitsData


def test_registered_under_its_name() -> None:
    assert "pdasgd" in StrategyRegistry
    trainer = L.Trainer(strategy="pdasgd", **trainer_kwargs())
    assert isinstance(trainer.strategy, PDASGDStrategy)
    # the default threads: 1:2, fitted to the cores on a CPU with under 3 (two losses in flight either way)
    assert trainer.strategy.backward_threads == min(2, max(1, torch.get_num_threads() - 1))
    assert trainer.strategy.max_in_flight == 2


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        (dict(backward_threads=0), "backward_threads"),
        (dict(forward_threads=0), "forward_threads"),
        (dict(max_in_flight=0), "max_in_flight"),
        (dict(backward_threads=1.5), "backward_threads"),
        (dict(wait_timeout=0), "wait_timeout"),
        (dict(forward_threads=2), "forward_threads"),
        (dict(intra_op_threads=0), "intra_op_threads"),
        (dict(replica_merge="average"), "replica_merge"),
    ],
)
def test_constructor_rejects_bad_values(kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        PDASGDStrategy(**kwargs)


class TwoOptimizers(DigitsClassifier):
    def configure_optimizers(self) -> Any:
        return [torch.optim.SGD(self.net[0].parameters(), lr=0.1), torch.optim.SGD(self.net[3].parameters(), lr=0.1)]


@pytest.mark.parametrize(
    ("model", "trainer_overrides", "match"),
    [
        (TwoOptimizers, {}, "multiple optimizers"),  # Lightning itself refuses this one
        (lambda: DigitsClassifier(optimizer=lambda p: torch.optim.LBFGS(p)), {}, "LBFGS"),
        (
            DigitsClassifier,
            dict(plugins=[MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))]),
            "bf16-mixed",
        ),
    ],
    ids=["two-optimizers", "lbfgs", "grad-scaler"],
)
def test_unsupported_settings_fail_at_setup(model: Any, trainer_overrides: dict[str, Any], match: str) -> None:
    trainer = L.Trainer(strategy="pdasgd", max_steps=2, **trainer_kwargs(**trainer_overrides))
    with pytest.raises((MisconfigurationException, ValueError, RuntimeError), match=match):
        trainer.fit(model(), DigitsData())


def test_gradient_clip_by_value_is_applied_per_parameter() -> None:
    L.seed_everything(0)
    results = []
    for strategy in ("auto", PDASGDStrategy(max_in_flight=1)):
        L.seed_everything(0)
        model = DigitsClassifier(optimizer=lambda p: torch.optim.SGD(p, lr=0.5))
        trainer = L.Trainer(
            strategy=strategy, max_steps=15, limit_val_batches=0, gradient_clip_val=0.01,
            gradient_clip_algorithm="value", **trainer_kwargs(),
        )
        trainer.fit(model, DigitsData())
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert (results[0] - results[1]).abs().max() <= 1e-6


def _clipped_fit(strategy: Any, clip: float | None, algorithm: str | None, **overrides: Any) -> torch.Tensor:
    L.seed_everything(0)
    model = DigitsClassifier(optimizer=lambda p: torch.optim.SGD(p, lr=0.2, momentum=0.9))
    trainer = L.Trainer(
        strategy=strategy, max_steps=20, limit_val_batches=0, gradient_clip_val=clip,
        gradient_clip_algorithm=algorithm, **trainer_kwargs(**overrides),
    )
    trainer.fit(model, DigitsData())
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("algorithm", ["norm", None], ids=["norm", "default-algorithm"])
def test_gradient_clip_by_norm_matches_plain_with_one_in_flight(algorithm: str | None) -> None:
    """Lightning's default clipping (by the total norm of a step's gradients) equals plain Lightning's at one loss
    in flight: each backward's gradients are scaled together before its buckets are applied."""
    plain = _clipped_fit("auto", 0.05, algorithm)
    pdasgd = _clipped_fit(PDASGDStrategy(max_in_flight=1), 0.05, algorithm)
    unclipped = _clipped_fit("auto", None, None)
    assert (plain - unclipped).abs().max() > 1e-2, "the norm bound was never reached: the test checks nothing"
    assert (plain - pdasgd).abs().max() <= 1e-5


def test_gradient_clip_by_norm_trains_with_default_settings() -> None:
    """Several losses in flight: each bucket is clipped when it is stepped, by its backward's total norm as known
    then (``tests/test_norm_clipping.py`` checks the arithmetic)."""
    L.seed_everything(0)
    model = DigitsClassifier()
    strategy = PDASGDStrategy()
    trainer = L.Trainer(strategy=strategy, max_epochs=3, gradient_clip_val=0.5, **trainer_kwargs())
    trainer.fit(model, DigitsData())
    assert model.val_accuracy[-1] >= 0.9, model.val_accuracy


class GradientHooks(DigitsClassifier):
    def on_after_backward(self) -> None:
        pass


class GradientCallback(Callback):
    def on_before_optimizer_step(self, *args: Any) -> None:
        pass


def test_gradient_hooks_are_named_in_one_warning_at_setup() -> None:
    trainer = L.Trainer(strategy="pdasgd", max_steps=3, callbacks=[GradientCallback()], **trainer_kwargs())
    with pytest.warns(UserWarning, match="GradientHooks.on_after_backward.*GradientCallback.on_before_optimizer_step"):
        trainer.fit(GradientHooks(), DigitsData())


def test_bf16_mixed_trains() -> None:
    L.seed_everything(0)
    model = DigitsClassifier()
    trainer = L.Trainer(strategy="pdasgd", precision="bf16-mixed", max_epochs=3, **trainer_kwargs())
    trainer.fit(model, DigitsData())
    assert model.val_accuracy[-1] >= 0.9, model.val_accuracy


def test_log_grad_norm_replaces_gradient_norm_hooks(tmp_path: Any) -> None:
    from lightning.pytorch.loggers import CSVLogger

    trainer = L.Trainer(
        strategy=PDASGDStrategy(log_grad_norm=True), max_steps=10, log_every_n_steps=1,
        **trainer_kwargs(logger=CSVLogger(tmp_path)),
    )
    trainer.fit(DigitsClassifier(), DigitsData())
    assert float(trainer.callback_metrics["pdasgd/grad_norm"]) > 0


def test_intra_op_threads_apply_during_fit_only() -> None:
    before = torch.get_num_threads()
    seen = []

    class Probe(Callback):
        def on_train_batch_end(self, *args: Any) -> None:
            seen.append(torch.get_num_threads())

    trainer = L.Trainer(strategy=PDASGDStrategy(intra_op_threads=1), max_steps=3, callbacks=[Probe()],
                        **trainer_kwargs())
    trainer.fit(DigitsClassifier(), DigitsData())
    assert set(seen) == {1}
    assert torch.get_num_threads() == before


@pytest.mark.parametrize(("cores", "device", "expected"),
                         [(1, "cpu", 1), (2, "cpu", 1), (3, "cpu", 2), (16, "cpu", 2), (1, "cuda", 2), (2, "cuda", 2)])
def test_default_backward_threads_never_outnumber_a_cpus_cores(cores: int, device: str, expected: int) -> None:
    from lightning_pdasgd.engine.autotune import backward_threads_within_cores

    assert backward_threads_within_cores(2, torch.device(device), cores) == expected


class _BackwardWaitsForTheNextForward(torch.autograd.Function):
    """Identity whose backward waits until the next forward has started (an event, not a sleep) and records whether
    it did: two losses in flight let that forward start while this backward runs."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, next_forward: threading.Event, overlapped: list[bool]) -> torch.Tensor:
        ctx.next_forward, ctx.overlapped = next_forward, overlapped
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        ctx.overlapped.append(ctx.next_forward.wait(timeout=30.0))
        return grad, None, None


class _OverlapProbe(DigitsClassifier):
    def __init__(self, steps: int) -> None:
        super().__init__()
        self.steps, self.calls = steps, 0
        self.previous: threading.Event | None = None
        self.overlapped: list[bool] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.calls += 1
        if self.previous is not None:
            self.previous.set()  # this forward started: the previous backward may go on
        self.previous = threading.Event()
        if self.calls == self.steps:
            self.previous.set()  # no forward follows the last one
        x, y = batch
        logits = _BackwardWaitsForTheNextForward.apply(self(x), self.previous, self.overlapped)
        return nn.functional.cross_entropy(logits, y)


@pytest.mark.parametrize(("backward_threads", "expected_threads"), [(None, 1), (2, 2)])
def test_two_cores_run_the_default_as_one_backward_thread_with_two_losses_in_flight(
    backward_threads: int | None, expected_threads: int, caplog: pytest.LogCaptureFixture
) -> None:
    """On 2 cores the default's forward and backward keep a core each, and still overlap (two losses in flight); an
    explicit count is kept."""
    torch.set_num_threads(2)  # the autouse fixture gives the count back
    seen: list[tuple[int, int]] = []

    class Probe(Callback):
        def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
            seen.append((len([t for t in engine_threads() if "backward" in t.name]), trainer.strategy.max_in_flight))

    steps = 20
    model = _OverlapProbe(steps)
    strategy = PDASGDStrategy(backward_threads=backward_threads, synchronous_warmup=0)
    trainer = L.Trainer(strategy=strategy, max_steps=steps, callbacks=[Probe()], **trainer_kwargs())
    with caplog.at_level("INFO"):
        trainer.fit(model, DigitsData())
    start = [record.getMessage() for record in caplog.records if "PD-ASGD: 1 forward" in record.getMessage()]
    assert start and f"1 forward : {expected_threads} backward threads" in start[0]
    assert ("fitted to 2 CPU core(s)" in start[0]) == (backward_threads is None), start
    assert set(seen) == {(expected_threads, 2)}
    assert model.overlapped == [True] * steps  # every backward but the last ran while the next forward did
    assert strategy.backward_threads == expected_threads


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (dict(max_time="00:00:01:00"), "max_time"),
        (dict(val_check_interval=0.5), "val_check_interval=0.5"),
        (dict(val_check_interval=10), "val_check_interval=10"),
        (dict(check_val_every_n_epoch=None), "check_val_every_n_epoch=None"),
        (dict(callbacks=[ModelCheckpoint(every_n_train_steps=10)], enable_checkpointing=True),
         "every_n_train_steps"),
        (dict(callbacks=[ModelCheckpoint(train_time_interval=timedelta(minutes=1))], enable_checkpointing=True),
         "train_time_interval"),
    ],
)
def test_multi_device_refuses_per_rank_mid_epoch_points(overrides: dict[str, Any], match: str) -> None:
    from lightning_pdasgd.integration.setup_checks import check_multi_device_settings

    trainer = L.Trainer(**trainer_kwargs(**overrides))
    with pytest.raises(MisconfigurationException, match=match):
        check_multi_device_settings(trainer)


def test_several_devices_refuse_synchronized_batchnorm_by_name_with_the_fix() -> None:
    """Lightning hands ``sync_batchnorm=True`` to the strategy to apply; ignoring it would silently train something
    else, and SyncBatchNorm's per-layer collectives cannot run on ranks at their own pace."""
    from lightning_pdasgd.integration.setup_checks import check_fit_configuration

    model = DigitsClassifier()
    optimizers = [model.configure_optimizers()]
    flagged = L.Trainer(strategy=PDASGDStrategy(), sync_batchnorm=True, **trainer_kwargs(devices=2))
    with pytest.raises(MisconfigurationException, match=r"sync_batchnorm=True.*2 devices.*leave `sync_batchnorm` off"):
        check_fit_configuration(flagged, model, optimizers, world_size=2)

    plain_flags = L.Trainer(strategy=PDASGDStrategy(), **trainer_kwargs(devices=2))
    check_fit_configuration(plain_flags, model, optimizers, world_size=2)
    model.net = torch.nn.Sequential(torch.nn.SyncBatchNorm(64), model.net)  # converted by the user
    with pytest.raises(MisconfigurationException, match=r"SyncBatchNorm` layers \(net.0\).*revert"):
        check_fit_configuration(plain_flags, model, optimizers, world_size=2)
    # one device: a single replica's statistics are the synchronized ones, so the flag changes nothing
    check_fit_configuration(L.Trainer(strategy=PDASGDStrategy(), sync_batchnorm=True, **trainer_kwargs()), model,
                            optimizers, world_size=1)


@pytest.mark.parametrize(
    "overrides",
    [dict(max_epochs=3, limit_train_batches=10), dict(max_steps=100), dict(limit_train_batches=0.5),
     dict(callbacks=[ModelCheckpoint(monitor="val_acc", save_last=True)], enable_checkpointing=True)],
)
def test_multi_device_accepts_limits_counted_over_all_ranks(overrides: dict[str, Any]) -> None:
    """max_steps and limit_train_batches count the batches of all ranks together (tested in test_distributed)."""
    from lightning_pdasgd.integration.setup_checks import check_multi_device_settings

    check_multi_device_settings(L.Trainer(**trainer_kwargs(**overrides)))


def test_two_optimizers_get_param_group_advice_and_the_manual_way_out() -> None:
    """Lightning's own refusal suggests manual optimization; PD-ASGD's adds param groups, and that manual
    optimization runs as Lightning's own step."""
    trainer = L.Trainer(strategy="pdasgd", max_steps=2, **trainer_kwargs())
    with pytest.raises(MisconfigurationException) as excinfo:
        trainer.fit(TwoOptimizers(), DigitsData())
    message = str(excinfo.value)
    assert "param groups of one optimizer" in message and "Lightning's own synchronous step" in message


def test_idle_backward_threads_warn() -> None:
    with pytest.warns(UserWarning, match="backward_threads=3.*max_in_flight=2.*1 backward thread"):
        PDASGDStrategy(backward_threads=3, max_in_flight=2)


def test_engine_configuration_is_logged_at_start(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("INFO"):
        L.Trainer(strategy=PDASGDStrategy(backward_threads=3), max_steps=3, **trainer_kwargs()).fit(
            DigitsClassifier(), DigitsData()
        )
    lines = [record.getMessage() for record in caplog.records if "PD-ASGD: 1 forward : 3 backward" in record.getMessage()]
    assert lines and "max_in_flight=3" in lines[0] and "intra-op" in lines[0] and "buckets" in lines[0], lines
