"""Activation checkpointing: a forward recomputed during its backward reads the weights that forward read.

Why: ``torch.utils.checkpoint`` runs a segment of the forward again inside the backward, on the backward thread,
and the segment looks its parameters up on the modules. By then the loop thread's engine forward has put the
module's parameters back, or points them at the leaves of the next forward. The recompute would read the live
weights or another forward's: with ``use_reentrant=True`` its gradients went to the live parameters, which the
engine never steps, and the checkpointed layers silently stopped training; with ``use_reentrant=False`` the saved
tensors came from other weights than the gradient's.

So a backward thread that calls one of the user's modules points that module's own parameters at its stash's
leaves for the call (a pre-hook and an always-called post-hook) and gives them back after. The modules' parameter
places hold one set of leaves at a time: the loop thread holds them for its whole forward and for the engine's
check of the parameter set, a backward thread for one module call, in turn (an ``RLock``, for nested modules).
The post-hooks are installed at the first recomputation only, so a model without checkpointing pays nothing for
them. A recomputation also runs each module in the mode its forward saw: Lightning puts the model in eval mode for
validation before the engine's drain runs the last backwards, so the drain restores the training flags of the last
forward around it (remembered at each forward once a recomputation was seen, and at the first).

Between steps, user code that walks a recomputed module's parameters from the loop thread (a callback) may meet,
for the length of one module call, the weights of the forward being recomputed instead of the live ones.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_pdasgd.engine.parameter_buckets import ParameterBucket
from lightning_pdasgd.engine.weight_stash import WeightStash
from lightning_pdasgd.errors import EngineTimeoutError

# (a module's ``_parameters``, the name there, the bucket, the position in the bucket) of one trained parameter
Place = tuple[dict[str, Any], str, int, int]


class Recomputation:
    """The one owner of the modules' parameter places while the engine runs.

    Args:
        owners: every module that holds a trained parameter directly.
        buckets: the engine's buckets (index = position).
        wait_timeout: the longest wait for the places (``PDASGDStrategy(wait_timeout=...)``).
    """

    def __init__(self, owners: list[nn.Module], buckets: list[ParameterBucket], wait_timeout: float) -> None:
        position = {id(param): (bucket.index, at) for bucket in buckets for at, param in enumerate(bucket.params)}
        self._places: dict[nn.Module, list[Place]] = {
            owner: [
                (owner._parameters, name, *position[id(param)])
                for name, param in owner._parameters.items()
                if param is not None and id(param) in position
            ]
            for owner in owners
        }
        self._wait_timeout = wait_timeout
        self._places_lock = threading.RLock()
        self._local = threading.local()  # .stash: the backward this thread runs; .calls: its modules' saved places
        self._exit_handles: list[RemovableHandle] = []
        self._modes: list[tuple[nn.Module, bool]] | None = None  # every module's training flag at the last forward
        self.seen = False  # a backward called a module (checkpointing): the post-hooks stay for the fit

    def forward_started(self, module: nn.Module) -> None:
        """The loop thread starts a forward: remember the modules' training flags (where recomputation needs them)."""
        if self.seen or self._modes is None:
            self._modes = [(submodule, submodule.training) for submodule in module.modules()]

    @contextmanager
    def modes_of_the_last_forward(self) -> Iterator[None]:
        """Around a drain: the backwards it waits for recompute in the modes their forwards ran in, not in the eval
        mode Lightning set for the validation that the drain comes before."""
        modes = self._modes if self.seen else None
        now = [(submodule, submodule.training) for submodule, _ in modes] if modes else []
        for submodule, training in modes or ():
            submodule.training = training
        try:
            yield
        finally:
            for submodule, training in now:
                submodule.training = training

    @contextmanager
    def places_held(self) -> Iterator[None]:
        """The loop thread, while its forward points every module at its leaves, or while the engine reads which
        parameters the modules hold (a module recomputed meanwhile would show a backward's leaves)."""
        self._acquire("the modules' parameters, held by a backward recomputing a checkpointed segment")
        try:
            yield
        finally:
            self._places_lock.release()

    @contextmanager
    def backward_of(self, stash: WeightStash) -> Iterator[None]:
        """A backward thread runs the backward of ``stash``: a module it calls reads that stash's leaves."""
        self._local.stash = stash
        try:
            yield
        finally:
            self._local.stash = None

    def backward_stash(self) -> WeightStash | None:
        """The stash whose backward this thread runs (``None`` on the loop thread)."""
        return getattr(self._local, "stash", None)

    def enter(self, module: nn.Module, stash: WeightStash) -> None:
        """A backward thread calls ``module`` (a recomputation): point its parameters at ``stash``'s leaves."""
        places = self._places.get(module)
        if not places:
            return
        self._acquire("the modules' parameters, held by the forward of the next batch")
        leaves = stash.buffers.leaves
        saved: list[Tensor] = []
        for params, name, bucket, position in places:
            saved.append(params[name])
            params[name] = leaves[bucket][position]
        calls = getattr(self._local, "calls", None)
        if calls is None:
            calls = self._local.calls = []
        calls.append((module, saved))
        if not self.seen:
            self.seen = True
            self.attach()

    def exit(self, module: nn.Module) -> None:
        """After a module call (every thread, the loop thread's too): give back what ``enter`` pointed."""
        calls = getattr(self._local, "calls", None)
        if not calls or calls[-1][0] is not module:
            return
        _, saved = calls.pop()
        for (params, name, _, _), tensor in zip(self._places[module], saved):
            params[name] = tensor
        self._places_lock.release()

    def attach(self) -> None:
        """The post-hooks, once a recomputation was seen (again after a ``close``). Idempotent."""
        if self._exit_handles or not self.seen:
            return
        for owner in self._places:
            hook = _CallEnded(self)
            self._exit_handles.append(owner.register_forward_hook(hook, always_call=True))

    def close(self) -> None:
        for handle in self._exit_handles:
            handle.remove()
        self._exit_handles.clear()

    def _acquire(self, what: str) -> None:
        if not self._places_lock.acquire(timeout=self._wait_timeout):
            raise EngineTimeoutError(
                f"PD-ASGD: waited more than `wait_timeout` ({self._wait_timeout:g} s) for {what}."
                " Raise `PDASGDStrategy(wait_timeout=...)` if a forward or a checkpointed segment takes that long."
            )


def _no_hook(module: nn.Module, args: Any, output: Any) -> None:
    """What a copy of a user's module holds in place of the engine's post-hook."""


def _returns_no_hook() -> Any:
    return _no_hook


class _CallEnded:
    """The always-called forward hook on a user's module; a copy (``deepcopy``, pickling) gets one doing nothing."""

    __slots__ = ("_recomputation",)

    def __init__(self, recomputation: Recomputation) -> None:
        self._recomputation = recomputation

    @torch.compiler.disable  # a compiled submodule calls it eagerly, as the pre-hook (``lazy_reads.py``)
    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        self._recomputation.exit(module)

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        return _no_hook

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        return _returns_no_hook, ()
