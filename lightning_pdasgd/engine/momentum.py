"""The momentum arithmetic of staleness compensation: an optimizer's momentum, and how much of it asynchrony
already supplies (``compensation.py`` applies it per step).

Pure functions of a param group's hyperparameters, so they are exact to test and shared by the momentum correction
and the weight prediction.
"""

from __future__ import annotations

from typing import Any, Optional


def corrected_momentum(momentum: float, expected_staleness: float, strength: float = 1.0) -> float:
    """The explicit momentum ``m'`` with ``1 - m' = (1 - m) * (1 + strength * E[s])``, clamped to ``[0, m]``.

    Asynchrony with mean staleness ``E[s]`` acts like an implicit momentum ``E[s] / (1 + E[s])`` (Mitliagkas et
    al.); ``strength=1`` removes exactly that much. Larger values also damp the oscillations that stale gradients
    excite at learning rates near the edge of stability.
    """
    if momentum <= 0.0 or expected_staleness <= 0.0:
        return momentum
    return min(momentum, max(0.0, 1.0 - (1.0 - momentum) * (1.0 + strength * expected_staleness)))


def momentum_of(hyperparameters: dict[str, Any]) -> float:
    """An optimizer's momentum (``momentum``, or ``betas[0]`` for the Adam family); 0 without one."""
    momentum = hyperparameters.get("momentum")
    if isinstance(momentum, (int, float)) and momentum > 0:
        return float(momentum)
    betas = hyperparameters.get("betas")
    if isinstance(betas, (tuple, list)) and len(betas) >= 2 and isinstance(betas[0], (int, float)):
        return float(betas[0])
    return 0.0


def has_momentum(hyperparameters: dict[str, Any]) -> bool:
    """Whether an optimizer's param group carries a positive momentum (``momentum`` or ``betas[0]``)."""
    momentum = hyperparameters.get("momentum")
    if isinstance(momentum, (int, float)) and momentum > 0:
        return True
    betas = hyperparameters.get("betas")
    return isinstance(betas, (tuple, list)) and len(betas) >= 2 and isinstance(betas[0], (int, float)) and betas[0] > 0


def momentum_overrides(
    hyperparameters: dict[str, Any], expected_staleness: float, strength: float = 1.0
) -> Optional[dict[str, Any]]:
    """The corrected ``momentum`` or ``betas`` of one step (``None`` when there is nothing to correct)."""
    if expected_staleness == 0.0:
        return None
    momentum = hyperparameters.get("momentum")
    if isinstance(momentum, (int, float)) and momentum > 0:
        return {"momentum": corrected_momentum(float(momentum), expected_staleness, strength)}
    betas = hyperparameters.get("betas")
    if isinstance(betas, (tuple, list)) and len(betas) >= 2 and isinstance(betas[0], (int, float)) and betas[0] > 0:
        return {"betas": (corrected_momentum(float(betas[0]), expected_staleness, strength), *betas[1:])}
    return None
