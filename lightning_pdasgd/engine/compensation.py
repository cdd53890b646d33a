"""Staleness compensation: keep the hyperparameters tuned for synchronous training working under asynchrony.

Why it is needed: an update computed from weights read ``s`` updates ago behaves like extra momentum ("Asynchrony
begets momentum", Mitliagkas et al. 2016). On top of the user's explicit momentum (SGD's ``momentum``, Adam's
``beta1``) the total is too much, and the range of learning rates at which heavy-ball SGD is stable shrinks fast
with the delay: a learning rate tuned with plain Lightning can diverge under PD-ASGD.

The engine knows each update's staleness exactly (per parameter, remote updates of other ranks included) and
still holds the weights its forward read, so it can correct for it. Methods (``STALENESS_COMPENSATIONS``):

- ``"predict"`` (the default; weight prediction, as in SpecTrain / PipeMare): the forward reads the weights
  extrapolated along the measured per-update velocity by the expected staleness,
  ``w + E[s] * (w - w_prev) / (v - v_prev)``, so the gradient is computed close to the weights it will be applied to.
  Optimizer-agnostic: the velocity is the applied update itself (momentum buffer x lr for SGD, the bias-corrected Adam
  step, ...): a copy of the weights before each update, except for heavy-ball SGD, whose momentum buffer times ``-lr``
  is exactly its update (``observe_velocity``: no copy). Without momentum (plain SGD, Adagrad, RMSprop with
  ``momentum=0``) the last update is one noisy gradient, whose extrapolation hurts stability, so the forward then
  reads the weights unchanged. It leaves the
  optimizer's hyperparameters alone, so per-step progress is plain's. Chosen over ``"predict+momentum"`` on 5-14
  paired seeds with lazy layer-wise reads (benchmarks/results/convergence-paired): the digits CNN at lr 0.1 0.934 vs
  0.818 (plain 0.962), cnn32 at lr 0.02 0.967 vs 0.830 (plain 0.974), VGG-BN heavy-ball 0.944 vs 0.950 (plain
  0.960), the small MLP at lr 0.2 0.935 vs 0.943 (plain 0.943). Lowering the momentum costs the small CNNs far more
  than it buys near the stability edge, where the divergence guard catches what prediction cannot hold.
- ``"predict+momentum"`` (the default until this release): prediction and half the momentum correction below, ``1 - m' =
  (1 - m) * (1 + E[s] / 2)`` for momentum 0.9 and above, less below (none at 0.5 and below:
  ``DEFAULT_MOMENTUM_RAMP``). It was chosen when every bucket was read at the step's start, where the whole model
  was stale; with lazy reads it holds the high-lr MLP rows a point better and loses 12-14 points on small BatchNorm
  CNNs at ordinary learning rates.
- ``"momentum"``: lowers the optimizer's momentum (``momentum`` of SGD/RMSprop, ``beta1`` of ``betas``) so that
  explicit and implicit momentum together match the user's: ``1 - m' = (1 - m) * (1 + E[s])``.
  Optimizers without a momentum hyperparameter (plain SGD, Adagrad, ...) are left unchanged.
- ``"lr"``: staleness-aware learning rate, ``lr / (1 + s)`` for an update of staleness ``s``.
- ``"dc"``: delay compensation (DC-ASGD, Zheng et al. 2017), ``g + lambda * g * g * (w_now - w_read)``.
- ``"none"``: no compensation (the raw asynchronous updates).

Every method leaves updates of staleness 0 bitwise unchanged, so ``max_in_flight=1`` stays exactly plain
Lightning. The API works on lists of tensors with one staleness per call, so one call can serve a bucket of
parameters updated together by a foreach/fused optimizer: no per-element Python and no host synchronisation.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any, Optional, Union

import torch
from torch import Tensor

from lightning_pdasgd.engine.compensation_base import (  # noqa: F401 - Key, Velocity: re-exported
    Key,
    StalenessCompensation,
    Velocity,
)
from lightning_pdasgd.engine.momentum import (  # noqa: F401 - corrected_momentum: re-exported
    corrected_momentum,
    has_momentum,
    momentum_of,
    momentum_overrides,
)

STALENESS_COMPENSATIONS = ("predict", "predict+momentum", "momentum", "lr", "dc", "none")
DEFAULT_STALENESS_COMPENSATION = "predict"  # measured best: benchmarks/results/convergence-paired

# a prediction is written tensor by tensor (one pass over memory) for buckets of at most this many tensors, or of
# tensors this large on average; else by two multi-tensor kernels (a copy and a lerp: two passes, fewer calls)
_LARGE_TENSORS_UP_TO = 4
_LARGE_NUMEL = 1 << 14


class WeightPrediction(StalenessCompensation):
    """The forward reads ``w + E[s] * velocity``: the weights extrapolated to when its update will be applied.

    ``velocity`` is the average applied change per update of the parameter since the last local update (remote
    ranks' updates included, as they count in versions), so it needs no knowledge of the optimizer. Costs one
    copy per update (none for heavy-ball SGD: ``observe_velocity``) and one pass per forward.
    """

    name = "predict"
    uses_read = False

    def __init__(
        self,
        staleness_decay: float = 0.9,
        scale: float = 1.0,
        correct_momentum: bool = False,
        momentum_strength: float = 1.0,
        momentum_ramp: Optional[tuple[float, float]] = None,
    ) -> None:
        super().__init__(staleness_decay)
        if not scale >= 0.0:
            raise ValueError(f"`scale` must be >= 0, got {scale!r}.")
        if not momentum_strength >= 0.0:
            raise ValueError(f"`momentum_strength` must be >= 0, got {momentum_strength!r}.")
        if momentum_ramp is not None and not 0.0 <= momentum_ramp[0] < momentum_ramp[1] <= 1.0:
            raise ValueError(f"`momentum_ramp` must be (low, high) with 0 <= low < high <= 1, got {momentum_ramp!r}.")
        self.scale = scale
        self.correct_momentum = correct_momentum
        self.momentum_strength = momentum_strength
        self.momentum_ramp = momentum_ramp

    def strength_at(self, momentum: float) -> float:
        """The correction's strength for an optimizer with this momentum: ``momentum_strength``, or with a ramp
        ``(low, high)`` none up to ``low``, rising linearly to ``momentum_strength`` at ``high``. One step of delay
        shrinks heavy-ball's stable learning-rate range 6x at momentum 0.5 and 38x at 0.9 (``shared`` notes'
        stability table), while a correction costs per-step progress wherever it acts."""
        if self.momentum_ramp is None:
            return self.momentum_strength
        low, high = self.momentum_ramp
        return self.momentum_strength * min(max((momentum - low) / (high - low), 0.0), 1.0)

    uses_velocity = True

    def wants_fill(self, key: Key, version: int) -> bool:
        state = self._states.get(key)
        return (
            state is not None
            and (state.velocity is not None or state.previous is not None)
            and state.momentum
            and state.mean_staleness > 0.0
            and version - state.previous_version > 0
        )

    def observe_velocity(self, key: Key, velocity: Optional[Velocity]) -> None:
        """Heavy-ball SGD records its exact update in its momentum buffers: with them, no copy of the weights
        before each update is needed (that copy was 2 of the prediction's 5 passes over the weights)."""
        state = self._state(key)
        state.velocity = velocity
        if velocity is not None:
            state.previous = None

    def fill(self, key: Key, params: Sequence[Tensor], leaves: Sequence[Tensor], version: int) -> None:
        params, leaves = list(params), list(leaves)
        state = self._states.get(key)
        if state is not None and state.velocity is not None and self.wants_fill(key, version):
            buffers, factor = state.velocity
            if [b.shape for b in buffers] == [p.shape for p in params]:
                self._fill_along(buffers, params, leaves, factor * self.scale * state.mean_staleness
                                 / (version - state.previous_version))
                return
        if (
            not self.wants_fill(key, version)
            or state is None
            or state.previous is None
            or [p.shape for p in state.previous] != [p.shape for p in params]  # the last update left some out
        ):
            torch._foreach_copy_(leaves, params)
            return
        gap = version - state.previous_version
        # leaf = w + factor * (w - w_prev) = lerp(w_prev, w, 1 + factor)
        weight = 1.0 + self.scale * state.mean_staleness / gap
        if len(params) <= _LARGE_TENSORS_UP_TO or sum(p.numel() for p in params) >= _LARGE_NUMEL * len(params):
            for leaf, previous, param in zip(leaves, state.previous, params):  # one pass over memory per tensor
                torch.lerp(previous, param, weight, out=leaf)
        else:  # many small tensors: two multi-tensor kernels cost less than a Python call each (bitwise the same)
            torch._foreach_copy_(leaves, state.previous)
            torch._foreach_lerp_(leaves, params, weight)

    @staticmethod
    def _fill_along(buffers: list[Tensor], params: list[Tensor], leaves: list[Tensor], alpha: float) -> None:
        """``leaf = w + alpha * buffer``: one pass per tensor, or two multi-tensor kernels for many small ones."""
        if len(params) <= _LARGE_TENSORS_UP_TO or sum(p.numel() for p in params) >= _LARGE_NUMEL * len(params):
            for leaf, buffer, param in zip(leaves, buffers, params):
                torch.add(param, buffer, alpha=alpha, out=leaf)
        else:
            torch._foreach_copy_(leaves, params)
            torch._foreach_add_(leaves, buffers, alpha=alpha)

    def before_step(
        self,
        key: Key,
        params: Sequence[Tensor],
        grads: Sequence[Tensor],
        read: Sequence[Tensor],
        staleness: int,
        version: int,
        hyperparameters: dict[str, Any],
    ) -> Optional[dict[str, Any]]:
        state = self._observe(key, staleness)
        state.momentum = self.scale > 0.0 and has_momentum(hyperparameters)
        # no copy where no forward will predict (`wants_fill`): nothing was ever stale, or the optimizer carries no
        # momentum (its last update is one noisy gradient, which is not extrapolated)
        if state.momentum and state.mean_staleness > 0.0:
            state.previous_version = version
            if state.velocity is None:  # else the optimizer records this update itself (`observe_velocity`)
                params = list(params)
                if state.previous is None or [p.shape for p in state.previous] != [p.shape for p in params]:
                    state.previous = [torch.empty_like(param) for param in params]
                torch._foreach_copy_(state.previous, params)
        if not self.correct_momentum:
            return None
        strength = self.strength_at(momentum_of(hyperparameters))
        return momentum_overrides(hyperparameters, state.mean_staleness, strength) if strength > 0 else None

    def __repr__(self) -> str:
        return (
            f"WeightPrediction(scale={self.scale}, correct_momentum={self.correct_momentum},"
            f" momentum_strength={self.momentum_strength}, momentum_ramp={self.momentum_ramp})"
        )


class MomentumCorrection(StalenessCompensation):
    """Lower ``momentum`` (SGD, RMSprop) or ``betas[0]`` (Adam family) by the implicit momentum of the staleness.

    Optimizers with neither hyperparameter (or with momentum 0) are stepped unchanged.
    """

    name = "momentum"
    uses_read = False

    def __init__(self, staleness_decay: float = 0.9, strength: float = 1.0) -> None:
        super().__init__(staleness_decay)
        if not strength >= 0.0:
            raise ValueError(f"`strength` must be >= 0, got {strength!r}.")
        self.strength = strength

    def before_step(
        self,
        key: Key,
        params: Sequence[Tensor],
        grads: Sequence[Tensor],
        read: Sequence[Tensor],
        staleness: int,
        version: int,
        hyperparameters: dict[str, Any],
    ) -> Optional[dict[str, Any]]:
        return momentum_overrides(hyperparameters, self._observe(key, staleness).mean_staleness, self.strength)

    def __repr__(self) -> str:
        return f"MomentumCorrection(strength={self.strength})"


class StalenessAwareLR(StalenessCompensation):
    """``lr / (1 + s)`` for an update of staleness ``s`` (Zhang et al. 2016); a tensor ``lr`` is left alone."""

    name = "lr"
    uses_read = False

    def before_step(
        self,
        key: Key,
        params: Sequence[Tensor],
        grads: Sequence[Tensor],
        read: Sequence[Tensor],
        staleness: int,
        version: int,
        hyperparameters: dict[str, Any],
    ) -> Optional[dict[str, Any]]:
        self._observe(key, staleness)
        lr = hyperparameters.get("lr")
        if staleness == 0 or not isinstance(lr, (int, float)):
            return None
        return {"lr": lr / (1 + staleness)}


class DelayCompensation(StalenessCompensation):
    """DC-ASGD: ``g += lambda * g * g * (w_now - w_read)``, a first-order Taylor correction of the stale gradient
    with ``g * g`` as a cheap approximation of the Hessian's diagonal."""

    name = "dc"

    def __init__(self, staleness_decay: float = 0.9, lam: float = 1.0) -> None:
        super().__init__(staleness_decay)
        if not lam >= 0.0:
            raise ValueError(f"`lam` must be >= 0, got {lam!r}.")
        self.lam = lam

    def before_step(
        self,
        key: Key,
        params: Sequence[Tensor],
        grads: Sequence[Tensor],
        read: Sequence[Tensor],
        staleness: int,
        version: int,
        hyperparameters: dict[str, Any],
    ) -> Optional[dict[str, Any]]:
        self._observe(key, staleness)
        if staleness == 0 or self.lam == 0.0:
            return None
        grads = list(grads)
        shift = torch._foreach_sub(list(params), list(read))
        torch._foreach_mul_(shift, grads)
        torch._foreach_mul_(shift, grads)
        torch._foreach_add_(grads, shift, alpha=self.lam)
        return None

    def __repr__(self) -> str:
        return f"DelayCompensation(lam={self.lam})"


DEFAULT_MOMENTUM_STRENGTH = 0.5  # "predict+momentum"'s share of the momentum correction (the module docstring)
DEFAULT_MOMENTUM_RAMP = (0.5, 0.9)  # ... applied in full from momentum 0.9, not at all up to 0.5


def _predict_and_correct_momentum() -> StalenessCompensation:
    return WeightPrediction(correct_momentum=True, momentum_strength=DEFAULT_MOMENTUM_STRENGTH,
                            momentum_ramp=DEFAULT_MOMENTUM_RAMP)


_BY_NAME: dict[str, Callable[[], StalenessCompensation]] = {
    "predict": WeightPrediction,
    "predict+momentum": _predict_and_correct_momentum,  # type: ignore[dict-item]
    "momentum": MomentumCorrection,
    "lr": StalenessAwareLR,
    "dc": DelayCompensation,
    "none": StalenessCompensation,
}


def resolve(setting: Union[str, StalenessCompensation, None]) -> StalenessCompensation:
    """A fresh compensation object from the strategy's ``staleness_compensation`` setting (one per fit).

    A ``StalenessCompensation`` instance is copied (without its running state), so a strategy reused for another
    fit starts from zero.
    """
    if setting is None:
        setting = "none"
    if isinstance(setting, StalenessCompensation):
        clone = object.__new__(type(setting))
        clone.__dict__.update(setting.__dict__)
        clone._states, clone._states_lock = {}, threading.Lock()
        return clone
    if not isinstance(setting, str) or setting not in _BY_NAME:
        raise ValueError(
            f"PDASGDStrategy: `staleness_compensation` must be one of {STALENESS_COMPENSATIONS} or a"
            f" `lightning_pdasgd.compensation.StalenessCompensation` instance, got {setting!r}. Use"
            f" {DEFAULT_STALENESS_COMPENSATION!r} (the default) or 'none' to turn compensation off."
        )
    return _BY_NAME[setting]()
