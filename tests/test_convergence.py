"""Staleness compensation: the math of each method, exactness without staleness, and real learning at a learning rate
that plain Lightning handles but uncompensated PD-ASGD does not (issue #11)."""

from __future__ import annotations

import threading
from typing import Any

import lightning as L
import pytest
import torch

from lightning_pdasgd import PDASGDStrategy
from lightning_pdasgd.engine.compensation import (
    DEFAULT_STALENESS_COMPENSATION,
    STALENESS_COMPENSATIONS,
    DelayCompensation,
    MomentumCorrection,
    StalenessAwareLR,
    StalenessCompensation,
    WeightPrediction,
    corrected_momentum,
    momentum_overrides,
    resolve,
)
from tests.helpers import fit_digits, trainer_kwargs
from tests.models import DigitsClassifier, DigitsData

SGD_MOMENTUM = {"lr": 0.1, "momentum": 0.9, "dampening": 0, "nesterov": False, "weight_decay": 0}
ADAM = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0}
PLAIN_SGD = {"lr": 0.1, "momentum": 0, "dampening": 0, "nesterov": False, "weight_decay": 0}


# ----------------------------------------------------------------------------------------------- the math
def test_corrected_momentum_matches_explicit_plus_implicit_momentum() -> None:
    # 1 - m' = (1 - m) * (1 + E[s])
    assert corrected_momentum(0.9, 1.0) == pytest.approx(0.8)
    assert corrected_momentum(0.9, 0.5) == pytest.approx(0.85)
    assert corrected_momentum(0.9, 0.0) == 0.9
    assert corrected_momentum(0.9, 50.0) == 0.0, "clamped at zero momentum"
    assert corrected_momentum(0.0, 3.0) == 0.0
    assert corrected_momentum(0.9, 1.0, strength=2.0) == pytest.approx(0.7)  # a stronger correction


def test_momentum_overrides_per_optimizer_family() -> None:
    assert momentum_overrides(SGD_MOMENTUM, 1.0) == {"momentum": pytest.approx(0.8)}
    overrides = momentum_overrides(ADAM, 1.0)
    assert overrides is not None and overrides["betas"] == (pytest.approx(0.8), 0.999)
    assert momentum_overrides(PLAIN_SGD, 1.0) is None, "no momentum: nothing to correct"
    assert momentum_overrides({"lr": 0.1, "lr_decay": 0}, 1.0) is None  # Adagrad-like
    assert momentum_overrides(SGD_MOMENTUM, 0.0) is None


def test_momentum_correction_follows_the_running_mean_staleness() -> None:
    method = MomentumCorrection()
    p, g = torch.zeros(3), torch.ones(3)
    assert method.before_step(0, [p], [g], [p], 0, 0, SGD_MOMENTUM) is None
    overrides = method.before_step(0, [p], [g], [p], 2, 1, SGD_MOMENTUM)  # mean of (0, 2) = 1
    assert method.expected_staleness(0) == pytest.approx(1.0)
    assert overrides == {"momentum": pytest.approx(0.8)}
    assert method.expected_staleness("other key") == 0.0


def test_default_predicts_and_leaves_the_optimizers_hyperparameters_alone() -> None:
    """Prediction only: lowering the momentum cost small BatchNorm CNNs 12-14 points (convergence-paired)."""
    method = resolve(DEFAULT_STALENESS_COMPENSATION)
    assert isinstance(method, WeightPrediction) and not method.correct_momentum
    p, g = torch.zeros(3), torch.ones(3)
    assert method.before_step(0, [p], [g], [p], 1, 0, SGD_MOMENTUM) is None
    assert method.before_step(1, [p], [g], [p], 1, 0, ADAM) is None
    assert method.wants_fill(0, 1), "a stale bucket of an optimizer with momentum is read predicted"


def test_predict_and_momentum_corrects_half_of_it() -> None:
    method = resolve("predict+momentum")
    p, g = torch.zeros(3), torch.ones(3)
    # one update of staleness 1: 1 - m' = (1 - 0.9) * (1 + 1 / 2)
    assert method.before_step(0, [p], [g], [p], 1, 0, SGD_MOMENTUM) == {"momentum": pytest.approx(0.85)}
    overrides = method.before_step(1, [p], [g], [p], 1, 0, ADAM)
    assert overrides is not None and overrides["betas"] == (pytest.approx(0.85), 0.999)


def test_predict_and_momentum_corrects_only_where_delay_threatens_stability() -> None:
    """None at momentum 0.5 and below (it cost per-step progress there), all of it from 0.9, linear between."""
    method = resolve("predict+momentum")
    p, g = torch.zeros(3), torch.ones(3)
    assert method.before_step(0, [p], [g], [p], 1, 0, {**SGD_MOMENTUM, "momentum": 0.5}) is None
    overrides = method.before_step(1, [p], [g], [p], 1, 0, {**SGD_MOMENTUM, "momentum": 0.7})
    assert overrides == {"momentum": pytest.approx(1 - 0.3 * (1 + 0.5 * 0.5))}  # strength 1/2 x half the ramp
    assert method.before_step(2, [p], [g], [p], 1, 0, {**SGD_MOMENTUM, "momentum": 0.95}) == {
        "momentum": pytest.approx(1 - 0.05 * 1.5)}


def test_staleness_aware_lr() -> None:
    method = StalenessAwareLR()
    p, g = torch.zeros(2), torch.ones(2)
    assert method.before_step(0, [p], [g], [p], 0, 0, SGD_MOMENTUM) is None
    assert method.before_step(0, [p], [g], [p], 3, 1, SGD_MOMENTUM) == {"lr": pytest.approx(0.025)}


def test_delay_compensation_adds_the_taylor_term_in_place() -> None:
    method = DelayCompensation(lam=0.5)
    now = [torch.tensor([1.0, 2.0]), torch.tensor([0.0])]
    read = [torch.tensor([0.0, 1.0]), torch.tensor([1.0])]
    grads = [torch.tensor([2.0, -1.0]), torch.tensor([3.0])]
    assert method.before_step((0, 1), now, grads, read, 2, 5, SGD_MOMENTUM) is None
    # g + 0.5 * g * g * (now - read)
    assert torch.equal(grads[0], torch.tensor([2.0 + 0.5 * 4 * 1, -1.0 + 0.5 * 1 * 1]))
    assert torch.equal(grads[1], torch.tensor([3.0 + 0.5 * 9 * -1]))


def test_weight_prediction_extrapolates_the_last_update_by_the_expected_staleness() -> None:
    method = WeightPrediction()
    params = [torch.tensor([1.0, 1.0]), torch.tensor([2.0])]
    leaves = [torch.empty(2), torch.empty(1)]
    grads = [torch.zeros(2), torch.zeros(1)]
    key = ("bucket", 0)
    method.fill(key, params, leaves, version=0)  # no history yet: an exact copy
    assert all(torch.equal(leaf, param) for leaf, param in zip(leaves, params))
    method.before_step(key, params, grads, leaves, 2, 0, SGD_MOMENTUM)  # remembers w before the step
    params[0].sub_(torch.tensor([0.5, -0.5]))  # the optimizer step: version 0 -> 1
    params[1].sub_(1.0)
    method.fill(key, params, leaves, version=1)  # expected staleness 2: w + 2 * (w - w_prev)
    assert torch.allclose(leaves[0], torch.tensor([0.5 - 1.0, 1.5 + 1.0]))
    assert torch.allclose(leaves[1], torch.tensor([1.0 - 2.0]))
    method.fill(key, params, leaves, version=3)  # two more (remote) updates since: velocity per update / 3
    assert torch.allclose(leaves[1], torch.tensor([1.0 + 2.0 * (1.0 - 2.0) / 3]))


def test_weight_prediction_needs_momentum_and_staleness() -> None:
    for hyperparameters, staleness in ((PLAIN_SGD, 2), (SGD_MOMENTUM, 0)):
        method = WeightPrediction()
        param, leaf, grad = torch.tensor([1.0]), torch.empty(1), torch.zeros(1)
        method.before_step(0, [param], [grad], [leaf], staleness, 0, hyperparameters)
        param.sub_(1.0)
        method.fill(0, [param], [leaf], version=1)
        assert torch.equal(leaf, param), hyperparameters
        assert method._states[0].previous is None, "no copy of the weights that no forward will extrapolate from"


@pytest.mark.parametrize("name", STALENESS_COMPENSATIONS)
def test_staleness_zero_changes_nothing(name: str) -> None:
    method = resolve(name)
    params = [torch.randn(4), torch.randn(2, 2)]
    leaves = [torch.empty(4), torch.empty(2, 2)]
    for version in range(3):
        method.fill("k", params, leaves, version)
        assert all(torch.equal(leaf, param) for leaf, param in zip(leaves, params))
        grads = [torch.randn(4), torch.randn(2, 2)]
        before = [grad.clone() for grad in grads]
        assert method.before_step("k", params, grads, leaves, 0, version, dict(SGD_MOMENTUM)) is None
        assert all(torch.equal(grad, old) for grad, old in zip(grads, before))
        for param in params:
            param.add_(0.1)


def test_resolve_validates_and_copies() -> None:
    with pytest.raises(ValueError, match="staleness_compensation.*'predict'.*'none'"):
        PDASGDStrategy(staleness_compensation="magic")
    with pytest.raises(ValueError, match="staleness_compensation"):
        PDASGDStrategy(staleness_compensation=3)  # type: ignore[arg-type]
    custom = DelayCompensation(lam=0.25)
    custom.before_step(0, [torch.zeros(1)], [torch.zeros(1)], [torch.zeros(1)], 3, 0, SGD_MOMENTUM)
    fresh = resolve(custom)
    assert isinstance(fresh, DelayCompensation) and fresh.lam == 0.25 and fresh is not custom
    assert fresh.expected_staleness(0) == 0.0, "a new fit starts without the old running state"
    assert type(resolve("none")) is StalenessCompensation
    assert DEFAULT_STALENESS_COMPENSATION in STALENESS_COMPENSATIONS
    assert PDASGDStrategy().config.staleness_compensation == DEFAULT_STALENESS_COMPENSATION


# ----------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("name", [name for name in STALENESS_COMPENSATIONS if name != "none"])
def test_one_in_flight_stays_exactly_plain_with_compensation(name: str) -> None:
    plain, _ = fit_digits("auto", "sgd_momentum_nesterov_wd", steps=25)
    pdasgd, _ = fit_digits(PDASGDStrategy(max_in_flight=1, staleness_compensation=name),
                           "sgd_momentum_nesterov_wd", steps=25)
    for key, value in plain.state_dict().items():
        assert (value.double() - pdasgd.state_dict()[key].double()).abs().max().item() <= 1e-6, key


class _BackwardAfterNextForward(torch.autograd.Function):
    """Identity whose backward waits until the next batch's forward has read the weights.

    So every update is exactly one update stale, whatever the machine's speed: the asynchrony a heavier model (or
    a GPU) shows by itself, made deterministic for a small one.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, gate: "_NextForwardGate", position: tuple[int, int]) -> torch.Tensor:
        ctx.gate, ctx.position = gate, position
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        ctx.gate.wait_for_next(*ctx.position)
        return grad, None, None


class _NextForwardGate:
    def __init__(self) -> None:
        self.done: set[tuple[int, int]] = set()
        self.batches = 0
        self._changed = threading.Condition()

    def forward_done(self, epoch: int, index: int, batches: int) -> None:
        with self._changed:
            self.batches = batches
            self.done.add((epoch, index))
            self._changed.notify_all()

    def wait_for_next(self, epoch: int, index: int) -> None:
        if index + 1 >= self.batches:  # the epoch's last batch: the engine drains before the next epoch
            return
        with self._changed:
            assert self._changed.wait_for(lambda: (epoch, index + 1) in self.done, timeout=60), "no next forward"


class AlwaysOneStale(DigitsClassifier):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.gate = _NextForwardGate()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        position = (self.current_epoch, batch_idx)
        loss = _BackwardAfterNextForward.apply(super().training_step(batch, batch_idx), self.gate, position)
        self.gate.forward_done(*position, self.trainer.num_training_batches)
        return loss


# lr 0.2, momentum 0.9, 3 epochs: a learning rate plain Lightning handles. The run-to-run spread of one seed's final
# accuracy is several points (plain: 0.91-0.97 over these seeds), so the tests compare means over 8 seeds, paired.
STALE_LR_SEEDS = range(8)


def _sgd_lr_02(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.2, momentum=0.9)


def _accuracy(compensation: str, seed: int) -> float:
    L.seed_everything(seed)
    model = AlwaysOneStale(optimizer=_sgd_lr_02)
    # the guard and the warm-up off: this measures the compensation alone (the guard would also end the gating's
    # asynchrony, and the gate makes every update stale from the first)
    trainer = L.Trainer(strategy=PDASGDStrategy(backward_threads=2, staleness_compensation=compensation,
                                                divergence_guard=False, synchronous_warmup=0),
                        max_epochs=3, **trainer_kwargs())
    trainer.fit(model, DigitsData(batch_size=32))
    assert trainer.strategy.stats.mean_staleness > 0.9, "every update was one update stale"  # type: ignore[attr-defined]
    return model.val_accuracy[-1]


@pytest.fixture(scope="module")
def plain_accuracy() -> float:
    """Plain Lightning's mean final accuracy over the same seeds and settings (deterministic on CPU)."""
    accuracies = []
    for seed in STALE_LR_SEEDS:
        L.seed_everything(seed)
        model = DigitsClassifier(optimizer=_sgd_lr_02)
        L.Trainer(max_epochs=3, **trainer_kwargs()).fit(model, DigitsData(batch_size=32))
        accuracies.append(model.val_accuracy[-1])
    return sum(accuracies) / len(accuracies)


@pytest.mark.parametrize(
    ("compensation", "learns"), [("none", False), (DEFAULT_STALENESS_COMPENSATION, True)]
)
def test_lr_tuned_for_plain_lightning_learns_only_with_compensation(
    compensation: str, learns: bool, plain_accuracy: float
) -> None:
    """Every update one step stale: with the default compensation the mean final accuracy stays within 5 points of
    plain's; uncompensated PD-ASGD ends 30-45 points below. The 8-seed mean itself moves with thread scheduling
    (which buckets a forward reads before the previous backward's updates): 12 repeats gave 0.915-0.936 against
    plain's 0.944 (seed 3 alone ends at 0.84-0.94), so a 3-point bound failed one CI run in several."""
    accuracy = sum(_accuracy(compensation, seed) for seed in STALE_LR_SEEDS) / len(STALE_LR_SEEDS)
    assert (accuracy >= plain_accuracy - 0.05) == learns, (
        f"{compensation}: mean final accuracy {accuracy:.3f}, plain {plain_accuracy:.3f}"
    )
