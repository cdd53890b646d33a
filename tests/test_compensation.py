"""Staleness compensation on its own (no Trainer): the documented formulas of ``engine/compensation.py``, called
directly with small tensors and hand-picked staleness values."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from lightning_pdasgd.engine.compensation import (
    DEFAULT_MOMENTUM_RAMP,
    DEFAULT_MOMENTUM_STRENGTH,
    STALENESS_COMPENSATIONS,
    DelayCompensation,
    MomentumCorrection,
    StalenessAwareLR,
    StalenessCompensation,
    WeightPrediction,
    corrected_momentum,
    has_momentum,
    momentum_of,
    momentum_overrides,
    resolve,
)

SGD_MOMENTUM = {"lr": 0.1, "momentum": 0.9, "dampening": 0, "weight_decay": 0.0, "nesterov": False}
SGD_PLAIN = {"lr": 0.1, "momentum": 0.0, "dampening": 0, "weight_decay": 0.0, "nesterov": False}
ADAM = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0}


def _tensors(seed: int, count: int = 2) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(3, 2, generator=generator), torch.randn(2, generator=generator)][:count]


def _step(method: StalenessCompensation, staleness: int, hyperparameters: dict[str, Any] = SGD_MOMENTUM,
          key: Any = 0, version: int = 0, params: list[torch.Tensor] | None = None,
          grads: list[torch.Tensor] | None = None, read: list[torch.Tensor] | None = None) -> Any:
    params = params if params is not None else _tensors(1)
    grads = grads if grads is not None else _tensors(2)
    read = read if read is not None else _tensors(3)
    return method.before_step(key, params, grads, read, staleness, version, hyperparameters)


# ----------------------------------------------------------------------------------------------- momentum math
@pytest.mark.parametrize(
    ("momentum", "staleness", "strength", "expected"),
    [
        (0.9, 1.0, 1.0, 0.8),  # 1 - m' = 0.1 * 2
        (0.9, 3.0, 1.0, 0.6),  # 0.1 * 4
        (0.9, 2.0, 0.5, 0.8),  # 0.1 * (1 + 0.5 * 2)
        (0.99, 1.0, 2.0, 0.97),  # 0.01 * 3
        (0.5, 0.5, 1.0, 0.25),  # 0.5 * 1.5
        (0.9, 100.0, 1.0, 0.0),  # clamped at 0
        (0.9, 0.0, 1.0, 0.9),  # no staleness: unchanged
        (0.0, 5.0, 1.0, 0.0),  # no momentum: nothing to correct
        (0.9, 1.0, 0.0, 0.9),  # strength 0: unchanged
    ],
)
def test_corrected_momentum_follows_its_formula(momentum: float, staleness: float, strength: float,
                                                expected: float) -> None:
    """``1 - m' = (1 - m) * (1 + strength * E[s])``, clamped to ``[0, m]``."""
    assert corrected_momentum(momentum, staleness, strength) == pytest.approx(expected, abs=1e-12)


def test_corrected_momentum_never_raises_the_momentum() -> None:
    """A negative expected staleness (never produced, but a bad input) cannot push the momentum above ``m``."""
    assert corrected_momentum(0.9, -1.0) == 0.9
    for staleness in (0.1, 0.5, 1.0, 4.0):
        assert 0.0 <= corrected_momentum(0.95, staleness, 0.7) <= 0.95


def test_momentum_is_read_from_momentum_or_betas() -> None:
    """SGD/RMSprop carry ``momentum``, the Adam family ``betas[0]``; plain SGD and Adagrad carry none."""
    assert momentum_of(SGD_MOMENTUM) == 0.9 and has_momentum(SGD_MOMENTUM)
    assert momentum_of(ADAM) == 0.9 and has_momentum(ADAM)
    assert momentum_of(SGD_PLAIN) == 0.0 and not has_momentum(SGD_PLAIN)
    adagrad = {"lr": 0.01, "lr_decay": 0, "weight_decay": 0, "eps": 1e-10}
    assert momentum_of(adagrad) == 0.0 and not has_momentum(adagrad)
    assert not has_momentum({"betas": (0.0, 0.999)})


def test_momentum_overrides_correct_the_right_hyperparameter() -> None:
    """SGD gets a lower ``momentum``; Adam a lower ``betas[0]`` with ``betas[1]`` kept; no staleness or no momentum
    gives no override."""
    assert momentum_overrides(SGD_MOMENTUM, 1.0) == {"momentum": pytest.approx(0.8)}
    (beta1, beta2) = momentum_overrides(ADAM, 1.0, strength=0.5)["betas"]
    assert beta1 == pytest.approx(0.85) and beta2 == 0.999
    assert momentum_overrides(SGD_MOMENTUM, 0.0) is None
    assert momentum_overrides(SGD_PLAIN, 2.0) is None


# ----------------------------------------------------------------------------------------------- running mean
def test_expected_staleness_is_the_exact_mean_at_first_then_a_decaying_average() -> None:
    """The running mean is exact for the first ``1 / (1 - decay)`` updates, then an exponential average with
    weight ``1 - decay``; ``reset`` forgets it; keys are independent."""
    method = StalenessCompensation(staleness_decay=0.5)  # exact for the first 2 updates
    assert method.expected_staleness("w") == 0.0
    _step(method, 1, key="w")
    _step(method, 3, key="w")
    assert method.expected_staleness("w") == pytest.approx(2.0)
    _step(method, 6, key="w")
    assert method.expected_staleness("w") == pytest.approx(2.0 + 0.5 * (6 - 2.0))
    assert method.expected_staleness("b") == 0.0
    method.reset()
    assert method.expected_staleness("w") == 0.0


@pytest.mark.parametrize("decay", [-0.1, 1.0, 1.5])
def test_a_staleness_decay_outside_zero_one_is_rejected(decay: float) -> None:
    with pytest.raises(ValueError, match="staleness_decay"):
        StalenessCompensation(staleness_decay=decay)


# ----------------------------------------------------------------------------------------------- resolve
@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("predict", WeightPrediction),
        ("predict+momentum", WeightPrediction),
        ("momentum", MomentumCorrection),
        ("lr", StalenessAwareLR),
        ("dc", DelayCompensation),
        ("none", StalenessCompensation),
    ],
)
def test_resolve_builds_each_named_method(name: str, cls: type) -> None:
    """Each name of ``STALENESS_COMPENSATIONS`` gives a fresh object of its class (a new one per call)."""
    method = resolve(name)
    assert type(method) is cls
    assert resolve(name) is not method


def test_the_names_above_are_every_documented_name_and_none_means_none() -> None:
    """The parametrization above covers ``STALENESS_COMPENSATIONS`` exactly; ``None`` resolves to no compensation."""
    assert set(STALENESS_COMPENSATIONS) == {"predict", "predict+momentum", "momentum", "lr", "dc", "none"}
    assert type(resolve(None)) is StalenessCompensation


def test_predict_and_momentum_is_prediction_with_half_the_momentum_correction_ramped() -> None:
    """``"predict+momentum"``: prediction plus the momentum correction at strength 1/2, ramped in from momentum 0.5
    to 0.9 (module docstring)."""
    method = resolve("predict+momentum")
    assert isinstance(method, WeightPrediction)
    assert method.correct_momentum and method.momentum_strength == DEFAULT_MOMENTUM_STRENGTH == 0.5
    assert method.momentum_ramp == DEFAULT_MOMENTUM_RAMP == (0.5, 0.9)
    plain_predict = resolve("predict")
    assert not plain_predict.correct_momentum


def test_resolve_copies_an_instance_without_its_running_state() -> None:
    """An instance is copied with its settings but none of its history, so a strategy reused for another fit
    starts from zero and the two fits never share state."""
    original = DelayCompensation(staleness_decay=0.5, lam=0.25)
    _step(original, 4)
    clone = resolve(original)
    assert type(clone) is DelayCompensation and clone is not original
    assert clone.lam == 0.25 and clone.staleness_decay == 0.5
    assert clone.expected_staleness(0) == 0.0 and original.expected_staleness(0) == 4.0
    _step(clone, 2)
    assert original.expected_staleness(0) == 4.0


@pytest.mark.parametrize("setting", ["Predict", "sgd", "", 3])
def test_resolve_rejects_unknown_settings_naming_the_choices(setting: Any) -> None:
    with pytest.raises(ValueError, match="staleness_compensation"):
        resolve(setting)


# ----------------------------------------------------------------------------------------------- staleness 0
@pytest.mark.parametrize("name", STALENESS_COMPENSATIONS)
@pytest.mark.parametrize("hyperparameters", [SGD_MOMENTUM, SGD_PLAIN, ADAM], ids=["sgd-momentum", "sgd", "adam"])
def test_updates_of_staleness_zero_are_left_bitwise_unchanged(name: str, hyperparameters: dict[str, Any]) -> None:
    """Every method leaves a run of staleness-0 updates untouched: no gradient changed, no override, and the
    forward reads the live weights (no prediction), so ``max_in_flight=1`` stays exactly plain training."""
    method = resolve(name)
    params = _tensors(1)
    for version in range(4):
        grads, read = _tensors(2), _tensors(3)  # read != params: DC would change the gradient were s > 0
        kept = [grad.clone() for grad in grads]
        assert _step(method, 0, hyperparameters, version=version, params=params, grads=grads, read=read) is None
        assert all(torch.equal(grad, old) for grad, old in zip(grads, kept))
        assert not method.wants_fill(0, version + 1)
        torch._foreach_add_(params, 0.1)  # the update the optimizer would apply
    leaves = [torch.empty_like(param) for param in params]
    method.fill(0, params, leaves, 4)
    assert all(torch.equal(leaf, param) for leaf, param in zip(leaves, params))


# ----------------------------------------------------------------------------------------------- lr
def test_staleness_aware_lr_divides_by_one_plus_staleness() -> None:
    """``lr / (1 + s)``; staleness 0 and a tensor ``lr`` are left alone; nothing else is overridden."""
    method = StalenessAwareLR()
    assert _step(method, 3) == {"lr": pytest.approx(0.1 / 4)}
    assert _step(method, 1, ADAM) == {"lr": pytest.approx(1e-3 / 2)}
    assert _step(method, 0) is None
    assert _step(method, 2, {**SGD_MOMENTUM, "lr": torch.tensor(0.1)}) is None


# ----------------------------------------------------------------------------------------------- momentum correction
def test_momentum_correction_uses_the_running_mean_staleness() -> None:
    """``MomentumCorrection`` overrides ``momentum``/``betas[0]`` by ``corrected_momentum`` of the mean staleness
    seen so far for that key (not only this update's)."""
    method = MomentumCorrection(strength=1.0)
    assert _step(method, 2) == {"momentum": pytest.approx(corrected_momentum(0.9, 2.0))}
    # a staleness-0 update after a stale one is still corrected: the override follows the mean, E[s] = (2 + 0) / 2
    assert _step(method, 0) == {"momentum": pytest.approx(corrected_momentum(0.9, 1.0))}
    betas = _step(method, 1, ADAM, key="adam")["betas"]
    assert betas[0] == pytest.approx(corrected_momentum(0.9, 1.0)) and betas[1] == 0.999
    assert _step(method, 3, SGD_PLAIN, key="plain") is None  # nothing to correct


# ----------------------------------------------------------------------------------------------- delay compensation
def test_delay_compensation_matches_its_formula() -> None:
    """DC-ASGD: ``g += lam * g * g * (w_now - w_read)``, in place on the gradients, no override."""
    lam = 0.5
    method = DelayCompensation(lam=lam)
    params, read = _tensors(1), _tensors(3)
    grads = _tensors(2)
    expected = [g + lam * g * g * (w - r) for g, w, r in zip(grads, params, read)]
    assert _step(method, 2, params=params, grads=grads, read=read) is None
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    assert not all(torch.equal(got, old) for got, old in zip(grads, _tensors(2)))  # it did change them


def test_delay_compensation_is_independent_of_the_staleness_count_and_off_at_lambda_zero() -> None:
    """The correction uses the weight difference, not ``s``: staleness 1 and 5 with the same weights give the same
    gradients; ``lam=0`` changes nothing."""
    one, five = _tensors(2), _tensors(2)
    _step(DelayCompensation(), 1, grads=one)
    _step(DelayCompensation(), 5, grads=five)
    assert all(torch.equal(a, b) for a, b in zip(one, five))
    grads = _tensors(2)
    _step(DelayCompensation(lam=0.0), 3, grads=grads)
    assert all(torch.equal(a, b) for a, b in zip(grads, _tensors(2)))
    with pytest.raises(ValueError, match="lam"):
        DelayCompensation(lam=-1.0)


# ----------------------------------------------------------------------------------------------- weight prediction
def test_weight_prediction_extrapolates_by_the_expected_staleness_per_update() -> None:
    """With momentum and a mean staleness ``E[s] > 0``, a forward reading at ``version`` reads
    ``w + scale * E[s] * (w - w_prev) / (version - v_prev)``, where ``w_prev`` are the weights just before the
    last update (at ``v_prev``)."""
    method = WeightPrediction(scale=1.0)
    before = _tensors(1)
    _step(method, 2, params=before, version=3)  # E[s] = 2; remembers w_prev = before, v_prev = 3
    after = [w + 0.3 for w in before]  # the optimizer's update, and (say) remote ones: now at version 5
    assert method.wants_fill(0, 5)
    leaves = [torch.empty_like(w) for w in after]
    method.fill(0, after, leaves, 5)
    for leaf, w, w_prev in zip(leaves, after, before):
        torch.testing.assert_close(leaf, w + 2.0 * (w - w_prev) / 2, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shapes", [[(300, 100), (100,)], [(3, 2)] * 9], ids=["few-large", "many-small"])
def test_weight_prediction_writes_exactly_what_a_copy_and_a_lerp_write(shapes: list[tuple[int, ...]]) -> None:
    """Buckets of a few large tensors are predicted in one pass per tensor, buckets of many small ones by two
    multi-tensor kernels: both must be bitwise the forward's weights ``lerp(w_prev, w, 1 + E[s] / gap)``."""
    generator = torch.Generator().manual_seed(0)
    before = [torch.randn(shape, generator=generator) for shape in shapes]
    method = WeightPrediction()
    _step(method, 1, params=before, version=0, grads=[torch.ones(shape) for shape in shapes], read=before)
    _step(method, 2, params=before, version=1, grads=[torch.ones(shape) for shape in shapes], read=before)
    after = [w - 0.1 * torch.randn(w.shape, generator=generator) for w in before]
    leaves = [torch.full_like(w, float("nan")) for w in after]
    method.fill(0, after, leaves, 3)
    weight = 1.0 + method.expected_staleness(0) / 2  # the last update remembered was at version 1
    expected = [w_prev.clone() for w_prev in before]
    torch._foreach_lerp_(expected, after, weight)
    assert all(torch.equal(leaf, want) for leaf, want in zip(leaves, expected))


def test_weight_prediction_scale_multiplies_the_extrapolation() -> None:
    method = WeightPrediction(scale=0.5)
    before = _tensors(1)
    _step(method, 1, params=before, version=0)
    after = [w - 0.2 for w in before]
    leaves = [torch.empty_like(w) for w in after]
    method.fill(0, after, leaves, 1)
    for leaf, w, w_prev in zip(leaves, after, before):
        torch.testing.assert_close(leaf, w + 0.5 * 1.0 * (w - w_prev), rtol=1e-5, atol=1e-6)


def test_weight_prediction_reads_the_live_weights_without_momentum_or_before_any_update() -> None:
    """No prediction (the forward aliases the live weights) before a key's first update, right after the read
    version equals the remembered one, or when the optimizer has no momentum (its last update is one noisy
    gradient); ``fill`` then copies exactly."""
    method = WeightPrediction()
    assert not method.wants_fill(0, 0)
    _step(method, 2, SGD_PLAIN, params=_tensors(1), version=0)
    assert not method.wants_fill(0, 1)
    after = _tensors(4)
    leaves = [torch.empty_like(w) for w in after]
    method.fill(0, after, leaves, 1)
    assert all(torch.equal(leaf, w) for leaf, w in zip(leaves, after))

    _step(method, 2, SGD_MOMENTUM, key="m", params=_tensors(1), version=7)
    assert not method.wants_fill("m", 7)  # no update since the remembered weights: nothing to extrapolate
    assert method.wants_fill("m", 8)


def test_weight_prediction_with_momentum_correction_uses_the_ramp() -> None:
    """``correct_momentum=True`` also returns the momentum override, at ``strength_at(m)``: none up to the ramp's
    low end, ``momentum_strength`` from its high end, linear between."""
    method = WeightPrediction(correct_momentum=True, momentum_strength=0.5, momentum_ramp=(0.5, 0.9))
    assert method.strength_at(0.5) == 0.0 and method.strength_at(0.3) == 0.0
    assert method.strength_at(0.9) == pytest.approx(0.5) and method.strength_at(0.99) == pytest.approx(0.5)
    assert method.strength_at(0.7) == pytest.approx(0.25)
    assert _step(method, 2) == {"momentum": pytest.approx(corrected_momentum(0.9, 2.0, 0.5))}
    assert _step(method, 2, {**SGD_MOMENTUM, "momentum": 0.5}, key="low") is None
    assert _step(WeightPrediction(), 2) is None  # prediction alone never overrides


@pytest.mark.parametrize("shapes", [[(300, 100), (100,)], [(3, 2)] * 9], ids=["few-large", "many-small"])
@pytest.mark.parametrize("options", [{}, {"weight_decay": 0.01, "dampening": 0.1}, {"maximize": True}],
                         ids=["plain", "decay-dampening", "maximize"])
def test_weight_prediction_from_heavy_ball_buffers_matches_the_copy_of_the_weights(
    shapes: list[tuple[int, ...]], options: dict[str, Any]
) -> None:
    """Heavy-ball SGD moves the weights by exactly ``-lr * momentum_buffer``: given the buffers
    (``observe_velocity``), the prediction keeps no copy of the weights before each update and still reads what
    the copy-and-lerp prediction reads, for torch's own SGD steps."""
    generator = torch.Generator().manual_seed(0)
    start = [torch.randn(shape, generator=generator) for shape in shapes]
    runs = {}
    for from_buffers in (False, True):
        params = [torch.nn.Parameter(w.clone()) for w in start]
        optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9, **options)
        method = WeightPrediction()
        grads = torch.Generator().manual_seed(1)
        for version in range(3):
            for param in params:
                param.grad = torch.randn(param.shape, generator=grads)
            live = [param.detach() for param in params]
            method.before_step(0, live, [p.grad for p in params], live, 1, version, optimizer.param_groups[0])
            optimizer.step()
            if from_buffers:
                buffers = [optimizer.state[param]["momentum_buffer"] for param in params]
                method.observe_velocity(0, (buffers, -0.1))
        assert (method._states[0].previous is None) is from_buffers, "no copy of the weights with the buffers"
        leaves = [torch.full_like(w, float("nan")) for w in start]
        assert method.wants_fill(0, 3)
        method.fill(0, [param.detach() for param in params], leaves, 3)
        runs[from_buffers] = leaves
    for with_buffers, with_copy in zip(runs[True], runs[False]):
        torch.testing.assert_close(with_buffers, with_copy, rtol=1e-5, atol=1e-6)


def test_weight_prediction_falls_back_to_the_copy_when_the_optimizer_keeps_no_velocity() -> None:
    """``observe_velocity(key, None)`` (another optimizer, Nesterov, a bucket not every parameter of which moved):
    the next update copies the weights again; until then the forward reads the live weights."""
    method = WeightPrediction()
    _step(method, 1, version=0)
    method.observe_velocity(0, ([torch.zeros(3, 2), torch.zeros(2)], -0.1))
    assert method.wants_fill(0, 1) and method._states[0].previous is None
    method.observe_velocity(0, None)
    assert not method.wants_fill(0, 1)
    _step(method, 1, version=1)
    assert method._states[0].previous is not None and method.wants_fill(0, 2)
