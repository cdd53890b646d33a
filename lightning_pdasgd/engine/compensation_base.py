"""The interface every staleness compensation implements, and the running state it keeps per bucket.

Kept apart from the methods themselves (``compensation.py``) so that each module stays small; the engine calls
only what is defined here.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

Key = Hashable  # identifies one parameter or one bucket of parameters that is always updated together
# an optimizer's own record of its last update: (buffers, factor), the update moved the parameters by factor * buffers
Velocity = tuple[list[Tensor], float]


@dataclass(eq=False)
class _KeyState:
    """Per-key running state: the mean staleness seen, and (prediction) the weights before the last update."""

    mean_staleness: float = 0.0
    updates: int = 0
    previous: Optional[list[Tensor]] = None  # the live weights just before the last local update
    previous_version: int = 0  # the version before the last local update
    velocity: Optional["Velocity"] = None  # (prediction) the optimizer's exact last update, where it keeps one
    momentum: bool = False  # (prediction) the optimizer carries momentum, so its last update is a velocity


class StalenessCompensation:
    """Base class: no compensation. Subclasses override ``fill`` (the forward's weights) and/or ``before_step``.

    ``fill`` runs when a forward's stash is filled, under the locks of the parameters in ``params``;
    ``before_step`` runs on a backward thread just before the optimizer step of those parameters, under their
    locks. Both receive a ``key`` naming the parameter (or bucket) and lists aligned with it.
    """

    name = "none"

    def __init__(self, staleness_decay: float = 0.9) -> None:
        if not 0.0 <= staleness_decay < 1.0:
            raise ValueError(f"`staleness_decay` must be in [0, 1), got {staleness_decay!r}.")
        self.staleness_decay = staleness_decay
        self._states: dict[Key, _KeyState] = {}
        self._states_lock = threading.Lock()

    def reset(self) -> None:
        """Forget every running state (the weights were restored: the history no longer describes them)."""
        with self._states_lock:
            self._states = {}

    def _state(self, key: Key) -> _KeyState:
        state = self._states.get(key)
        if state is None:
            with self._states_lock:
                state = self._states.setdefault(key, _KeyState())
        return state

    def expected_staleness(self, key: Key) -> float:
        """The running mean of the staleness of ``key``'s updates (0 before the first one)."""
        state = self._states.get(key)
        return state.mean_staleness if state is not None else 0.0

    def _observe(self, key: Key, staleness: int) -> _KeyState:
        """Fold one update's staleness into the running mean (exact mean for the first 1/(1-decay) updates)."""
        state = self._state(key)
        state.updates += 1
        weight = max(1.0 - self.staleness_decay, 1.0 / state.updates)
        state.mean_staleness += weight * (staleness - state.mean_staleness)
        return state

    def wants_fill(self, key: Key, version: int) -> bool:
        """Whether a forward reading ``key`` at ``version`` should read ``fill``'s weights (a private copy) instead
        of aliasing the live values (no copy). The base class never predicts."""
        return False

    uses_velocity = False  # whether the engine should pass ``observe_velocity`` the optimizer's last update

    @property
    def uses_read(self) -> bool:
        """Whether ``before_step`` reads ``read`` (else the engine passes it empty: no list per update). Any
        ``before_step`` but this class's does, unless its class says ``uses_read = False``."""
        return type(self).before_step is not StalenessCompensation.before_step

    def observe_velocity(self, key: Key, velocity: Optional[Velocity]) -> None:
        """After each update of ``key`` (under its lock), where ``uses_velocity``: the optimizer's exact record of
        that update, ``(buffers, factor)`` (the parameters moved by ``factor * buffers``), or ``None`` where the
        optimizer keeps none."""

    def fill(self, key: Key, params: Sequence[Tensor], leaves: Sequence[Tensor], version: int) -> None:
        """Write the weights a forward reads into its stash ``leaves`` (default: an exact copy of ``params``)."""
        torch._foreach_copy_(list(leaves), list(params))

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
        """Called before stepping ``params`` with ``grads`` computed at ``read``, ``staleness`` updates ago.

        May modify ``grads`` in place; returns hyperparameter overrides for this step only (``None``: none).
        ``version`` is the parameters' update count before this step.
        """
        self._observe(key, staleness)
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
