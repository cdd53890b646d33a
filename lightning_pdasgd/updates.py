"""Layer-wise updates: each parameter is stepped by its own copy of the user's optimizer.

Why per-parameter optimizers: a backward pass produces gradients layer by layer, and PD-ASGD applies each one
the moment it is ready, while other backward passes update other layers. ``optimizer.step()`` on the user's
optimizer would touch every parameter and is not safe from several threads. One instance of the user's optimizer
class per parameter, with the same hyperparameters, reproduces a whole-model step exactly for element-wise
optimizers (SGD, Adam, AdamW, RMSprop, ...), and its state lives in the user's optimizer so checkpoints keep
Lightning's standard format.

Why a weight stash: a forward's graph saves the parameters it read. Updating them in place before its backward
runs either breaks autograd ("modified by an inplace operation") or silently mixes old and new weights. Each
forward therefore reads a private clone (the stash) and its backward computes the exact gradient at those
weights, which is then applied to the live parameter: the stale gradient that asynchronous SGD theory assumes.
The stash leaves are private to one backward, so concurrent backwards never share a gradient buffer.
"""

from __future__ import annotations

import inspect
import threading
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_pdasgd.metrics import BackwardRecord


@dataclass(eq=False)
class ParameterSlot:
    """Everything the engine keeps for one live parameter."""

    index: int
    name: str
    param: nn.Parameter
    alias: Tensor  # shares storage with ``param``; its ``.grad`` is ours, never the live ``param.grad``
    group_index: int
    optimizer: Optimizer
    lock: threading.Lock = field(default_factory=threading.Lock)
    version: int = 0  # updates applied to this replica's parameter (local and, with several ranks, remote)
    local_updates: int = 0  # updates made by this rank's backward threads
    local_updates_sent: int = 0  # of those, how many the replica exchange has already shared
    ready_event: Any = None  # CUDA event recorded after the latest update


@dataclass(eq=False)
class _StashBuffers:
    """Leaf tensors that receive one forward's copy of the weights; reused by later forwards."""

    tensors: dict[str, Tensor] = field(default_factory=dict)
    leaves: list[Tensor] = field(default_factory=list)
    current: WeightStash | None = None


@dataclass(eq=False)
class WeightStash:
    """The weights one forward read: private leaves and the version of each parameter at read time."""

    tensors: dict[str, Tensor]
    leaves: list[Tensor]
    versions: list[int]
    record: BackwardRecord = field(default_factory=BackwardRecord)
    hyperparameters: list[dict[str, Any]] | None = None
    step: int = -1  # Lightning's global_step when the forward ran, for error messages
    rank: int = 0
    buffers: _StashBuffers | None = None


NONFINITE_POLICIES = ("error", "skip", "off")


class NonFiniteError(FloatingPointError):
    """A loss or gradient was NaN or Inf; the update it would have caused was not applied."""


def per_parameter_optimizer(optimizer: Optimizer, group: dict[str, Any], tensor: Tensor) -> Optimizer:
    """Build an instance of the user's optimizer class for one tensor, from that tensor's param group.

    Only keys the constructor names are passed: groups carry extras (``initial_lr`` from schedulers,
    ``decoupled_weight_decay`` in AdamW) that constructors reject. All keys are copied before every step.
    """
    cls = type(optimizer)
    accepted = inspect.signature(cls.__init__).parameters
    kwargs = {key: value for key, value in group.items() if key != "params" and key in accepted}
    try:
        return cls([tensor], **kwargs)
    except Exception as error:  # noqa: BLE001 - re-raised with the fix named
        raise TypeError(
            f"PD-ASGD builds one `{cls.__name__}` per parameter from its param group ({sorted(kwargs)}) and could not:"
            f" {error}. Use an element-wise torch.optim optimizer (SGD, Adam, AdamW, RMSprop, ...) whose constructor"
            " accepts its param group's hyperparameters."
        ) from error


def hyperparameter_snapshot(optimizer: Optimizer) -> list[dict[str, Any]]:
    """The hyperparameters in force now, one dict per param group (what the plain ``optimizer.step()`` would use)."""
    return [{key: value for key, value in group.items() if key != "params"} for group in optimizer.param_groups]


class LayerwiseUpdater:
    """Creates weight stashes for forwards and applies their gradients to the live parameters.

    ``layerwise=True``: every parameter is updated from a post-accumulate-grad hook on its stash leaf, i.e. as
    soon as the backward pass has produced its gradient; one update at a time per parameter (a lock per
    parameter, none across layers). ``layerwise=False`` (the D-ASGD ablation): the gradients of a whole
    backward are applied together at its end, under one model-wide lock.
    """

    def __init__(
        self,
        module: nn.Module,
        optimizer: Optimizer,
        layerwise: bool = True,
        clip_value: float | None = None,
        log_grad_norm: bool = False,
        nonfinite: str = "error",
    ) -> None:
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"`nonfinite` must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
        self.nonfinite = nonfinite
        self.optimizer = optimizer
        self.layerwise = layerwise
        self.clip_value = clip_value
        self.log_grad_norm = log_grad_norm
        self._model_lock = threading.Lock()
        self.slots = self._build_slots(module, optimizer)
        self._free_buffers: list[_StashBuffers] = []  # list.append/pop are atomic: no lock needed

    @staticmethod
    def _build_slots(module: nn.Module, optimizer: Optimizer) -> list[ParameterSlot]:
        names = {id(param): name for name, param in module.named_parameters()}
        slots: list[ParameterSlot] = []
        seen: set[int] = set()
        for group_index, group in enumerate(optimizer.param_groups):
            for param in group["params"]:
                if not param.requires_grad or id(param) in seen:
                    continue  # frozen: the forward reads it live, nothing ever updates it
                seen.add(id(param))
                if id(param) not in names:
                    raise ValueError(
                        f"PD-ASGD: the optimizer holds a tensor of shape {tuple(param.shape)} that is not a parameter"
                        " of the LightningModule. Register every optimized tensor on the module (as an `nn.Parameter`"
                        " attribute or inside a submodule) so each forward can read a consistent copy of it."
                    )
                alias = param.detach()
                slots.append(
                    ParameterSlot(
                        index=len(slots),
                        name=names[id(param)],
                        param=param,
                        alias=alias,
                        group_index=group_index,
                        optimizer=per_parameter_optimizer(optimizer, group, alias),
                    )
                )
        if not slots:
            raise ValueError(
                "PD-ASGD: the optimizer from `configure_optimizers` holds no parameter that requires grad,"
                " so there is nothing to train."
            )
        return slots

    def stash(self) -> WeightStash:
        """Copy the live weights for one forward, each under its parameter's lock (no torn reads).

        The copies go into a recycled set of leaf tensors (one set per forward in flight), whose update hooks are
        registered once: a step then costs one copy per parameter, not a new tensor and a new hook.
        """
        buffers = self._free_buffers.pop() if self._free_buffers else self._new_buffers()
        versions: list[int] = []
        with torch.no_grad():
            for slot, leaf in zip(self.slots, buffers.leaves):
                with slot.lock:
                    if slot.ready_event is not None:
                        torch.cuda.current_stream(slot.param.device).wait_event(slot.ready_event)
                    leaf.copy_(slot.param)
                    versions.append(slot.version)
                leaf.grad = None
        stash = WeightStash(tensors=buffers.tensors, leaves=buffers.leaves, versions=versions, buffers=buffers)
        buffers.current = stash
        return stash

    def release(self, stash: WeightStash, reusable: bool) -> None:
        """Give a stash's leaves back once its backward has finished; a graph that never ran backward may still
        hold them (``reusable=False``), so those are left to the garbage collector."""
        buffers, stash.buffers = stash.buffers, None
        if buffers is not None and reusable:
            buffers.current = None
            self._free_buffers.append(buffers)

    def _new_buffers(self) -> _StashBuffers:
        buffers = _StashBuffers()
        for slot in self.slots:
            leaf = torch.empty_like(slot.param, requires_grad=True)
            if self.layerwise:
                leaf.register_post_accumulate_grad_hook(partial(self._on_gradient, buffers, slot.index))
            buffers.tensors[slot.name] = leaf
            buffers.leaves.append(leaf)
        return buffers

    def _on_gradient(self, buffers: _StashBuffers, index: int, leaf: Tensor) -> None:
        grad, leaf.grad = leaf.grad, None
        stash = buffers.current
        if grad is not None and stash is not None:
            self.apply(stash, index, grad)

    def apply_all(self, stash: WeightStash) -> None:
        """The whole-model update of ``layerwise=False``: every gradient of one backward, atomically."""
        with self._model_lock:
            for index, leaf in enumerate(stash.leaves):
                grad, leaf.grad = leaf.grad, None
                if grad is not None:
                    self.apply(stash, index, grad)

    def apply(self, stash: WeightStash, index: int, grad: Tensor) -> None:
        """Step one live parameter with the gradient computed at the stashed weights."""
        slot = self.slots[index]
        assert stash.hyperparameters is not None, "a stash is applied only after its hand-off"
        hyperparameters = stash.hyperparameters[slot.group_index]
        if self.nonfinite != "off" and not bool(torch.isfinite(grad).all()):
            if self.nonfinite == "skip":
                stash.record.skipped += 1
                return
            raise NonFiniteError(
                f"PD-ASGD: non-finite gradient for parameter '{slot.name}' at step {stash.step} on rank {stash.rank};"
                " it was not applied. Pass `PDASGDStrategy(nonfinite='skip')` to drop such updates and count them"
                " in `pdasgd/skipped_updates` instead."
            )
        if self.clip_value is not None:
            grad.clamp_(-self.clip_value, self.clip_value)
        if self.log_grad_norm:
            stash.record.grad_sq_sum += float(grad.detach().float().pow(2).sum())
        optimizer = slot.optimizer
        with slot.lock:
            if slot.ready_event is not None:  # CUDA: order after the last update or exchange of this parameter
                torch.cuda.current_stream(slot.param.device).wait_event(slot.ready_event)
            staleness = slot.version - stash.versions[index]
            optimizer.param_groups[0].update(hyperparameters)
            # the state lives in the user's optimizer (re-linked each time: load_state_dict replaces it); an
            # optimizer that keeps no state (plain SGD) leaves no entry, as its whole-model step would
            user_state = self.optimizer.state
            state = user_state.get(slot.param)
            if state is None:
                state = {}
            optimizer.state[slot.alias] = state
            slot.alias.grad = grad
            try:
                optimizer.step()
            finally:
                slot.alias.grad = None
            if state and slot.param not in user_state:
                user_state[slot.param] = state
            slot.version += 1
            slot.local_updates += 1
            if slot.param.is_cuda:
                slot.ready_event = torch.cuda.Event()
                slot.ready_event.record()
        stash.record.add_update(staleness)

    @property
    def versions(self) -> list[int]:
        return [slot.version for slot in self.slots]
