"""Lazy reads: each bucket is read when the forward reaches the first module that owns one of its parameters.

Why: the backward of batch t updates the output-side buckets first, and the forward of batch t+1 reaches them
last. Reading each bucket when the forward gets there (a forward pre-hook of its owner modules), instead of when
the step starts, lets the output side read weights that already include the previous backward's update: the
layers nearest the loss train almost without delay, which is what keeps deep BatchNorm networks stable at their
usual learning rates (the paper's "the second half of the layers use a new set of parameters").

A parameter used before its module runs -- directly in ``training_step``, a weight tied into a module that runs
earlier, a functional call on another module's weight -- must still read a consistent value before that use. The
first forward after the engine is built reads every bucket at its start and watches every torch call
(``TorchFunctionMode``); a bucket whose leaf is used before one of its owner modules started is read at the start
of every later forward. An undetected early use (a code path the first step did not take) meets an empty
placeholder and fails (in the forward, or in the backward when the gradient meets it) with a note naming
``lazy_reads=False``.

The same pre-hooks serve a module that a backward thread calls again (activation checkpointing,
``recomputation.py``), with ``lazy=False`` too.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.jit import ScriptModule
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves
from torch.utils.hooks import RemovableHandle

from lightning_pdasgd.engine.parameter_buckets import ParameterBucket
from lightning_pdasgd.engine.recomputation import Recomputation
from lightning_pdasgd.engine.weight_stash import UNREAD, StashPool, WeightStash


class LazyReads:
    """Reads a forward's buckets as its modules start; ``lazy=False`` reads every bucket when the step starts.

    Args:
        module: the LightningModule (its submodules get the pre-hooks).
        buckets: the engine's buckets (index = position).
        pool: the stash pool that points a bucket's leaves at what it reads.
        lazy: read when reached (the default) or at the start of the forward.
        wait_timeout: the longest wait for the modules' parameter places (``recomputation.py``).
    """

    def __init__(
        self, module: nn.Module, buckets: list[ParameterBucket], pool: StashPool, lazy: bool, wait_timeout: float
    ) -> None:
        self._pool = pool
        self._count = len(buckets)
        self._lazy = lazy
        self._early: list[int] = list(range(self._count))  # read at the forward's start (all until detection ran)
        self._stash: WeightStash | None = None
        self._forward_thread: int | None = None
        self._detector: _EarlyUseDetector | None = None
        self._detect = lazy
        self.forward_order: list[int] = list(reversed(range(self._count)))  # buckets as the forward reaches them
        self._module = module
        self._owners = _owner_modules(module, buckets)
        self.recomputation = Recomputation(list(self._owners), buckets, wait_timeout)
        self._handles: list[RemovableHandle] = []
        self.attach()

    @property
    def early(self) -> list[int]:
        """Buckets read at the start of every forward (all of them with ``lazy=False`` or before detection)."""
        return list(self._early)

    def attach(self) -> None:
        """Put the pre-hooks on the user's modules (engine steps). Idempotent."""
        self.recomputation.attach()
        if self._handles:
            return
        for owner, indices in self._owners.items():
            hook = _ReachedHook(self, tuple(indices))
            self._handles.append(owner.register_forward_pre_hook(hook, prepend=True))

    def close(self) -> None:
        """Remove the pre-hooks from the user's modules (end of fit, a rebuild, or while Lightning's own step runs:
        a module with a hook takes torch's slower call path, about 1.4 us more per call). Idempotent."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.recomputation.close()

    @contextmanager
    def forward(self, stash: WeightStash) -> Iterator[None]:
        """Run one forward of ``stash``: early buckets now, the rest as their modules start. The modules' parameter
        places are this forward's until it ends: point them at its leaves inside."""
        with self.recomputation.places_held():
            yield from self._forward(stash)

    def _forward(self, stash: WeightStash) -> Iterator[None]:
        self.recomputation.forward_started(self._module)
        for index in self._early:
            self._pool.read(stash, index)
        self._stash = stash
        self._forward_thread = threading.get_ident()
        detector = _EarlyUseDetector(stash.leaf_buckets()) if self._detect else None
        self._detector = detector
        try:
            if detector is None:
                yield
            else:
                with detector:
                    yield
        except Exception as error:
            add_unread_note(error, stash)
            raise
        finally:
            self._stash = None
            self._detector = None
        if detector is not None:
            self._detect = False
            self._early = sorted(detector.early)
            reached = detector.order + [index for index in self.forward_order if index not in detector.order]
            self.forward_order = reached

    def _reached(self, indices: tuple[int, ...], module: nn.Module, args: Any) -> None:
        stash = self._stash
        if stash is None or threading.get_ident() != self._forward_thread:  # not this forward's call
            recomputed = self.recomputation.backward_stash()
            if recomputed is not None:  # a backward thread runs the module again (activation checkpointing)
                self.recomputation.enter(module, recomputed)
            return  # else validation, a plain step, or another thread
        if self._detector is not None:
            self._detector.reach(indices)
        for index in indices:
            if stash.versions[index] == UNREAD:
                self._pool.read(stash, index)


def _no_hook(module: nn.Module, args: Any) -> None:
    """What a copy of a user's module holds in place of the engine's pre-hook: the copy is not trained here."""


def _returns_no_hook() -> Callable[[nn.Module, Any], None]:
    return _no_hook


class _ReachedHook:
    """The forward pre-hook on a user's module. Copying the module (``deepcopy``, e.g. for an EMA of the weights) or
    pickling it (``torch.save(model)``) must not copy the engine and its locks: the copy gets a hook that does
    nothing."""

    __slots__ = ("_reads", "_indices")

    def __init__(self, reads: LazyReads, indices: tuple[int, ...]) -> None:
        self._reads, self._indices = reads, indices

    @torch.compiler.disable  # a compiled submodule calls it eagerly: the read is a runtime decision, not graph code
    def __call__(self, module: nn.Module, args: Any) -> None:
        self._reads._reached(self._indices, module, args)

    def __deepcopy__(self, memo: dict[int, Any]) -> Callable[[nn.Module, Any], None]:
        return _no_hook

    def __reduce__(self) -> tuple[Callable[[], Callable[[nn.Module, Any], None]], tuple[()]]:
        return _returns_no_hook, ()


class _EarlyUseDetector(TorchFunctionMode):
    """Watches one forward: which buckets' leaves a torch call used before any of the bucket's modules started."""

    def __init__(self, leaf_buckets: dict[int, int]) -> None:
        super().__init__()
        self._leaf_buckets = leaf_buckets
        self._reached: set[int] = set()
        self.order: list[int] = []
        self.early: set[int] = set()

    def reach(self, indices: tuple[int, ...]) -> None:
        for index in indices:
            if index not in self._reached:
                self._reached.add(index)
                self.order.append(index)

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        for value in tree_leaves((args, kwargs)):
            if isinstance(value, Tensor):
                index = self._leaf_buckets.get(id(value))
                if index is not None and index not in self._reached:
                    self.early.add(index)
        return func(*args, **kwargs)


def _owner_modules(module: nn.Module, buckets: list[ParameterBucket]) -> dict[nn.Module, list[int]]:
    """Every module that holds a bucket's parameter directly (a tied weight has several owners). TorchScript modules
    take no hooks (and a fit with one runs Lightning's own step: ``setup_checks.synchronous_reason``)."""
    bucket_of = {id(param): bucket.index for bucket in buckets for param in bucket.params}
    owners: dict[nn.Module, list[int]] = {}
    for submodule in module.modules():
        if isinstance(submodule, ScriptModule):
            continue
        for param in submodule._parameters.values():
            index = bucket_of.get(id(param)) if param is not None else None
            if index is not None and index not in owners.setdefault(submodule, []):
                owners[submodule].append(index)
    return {owner: indices for owner, indices in owners.items() if indices}


def add_unread_note(error: BaseException, stash: WeightStash) -> None:
    """A forward or its backward failed where an unread bucket's placeholder may be the cause: a parameter used
    before its module ran (the placeholder then meets a real value, or its gradient a real shape)."""
    placeholder_met = UNREAD in stash.versions or "[0]" in str(error)
    if not isinstance(error, RuntimeError) or not placeholder_met or not hasattr(error, "add_note"):
        return
    error.add_note(
        "PD-ASGD reads each layer's weights when the forward reaches its module (lazy reads). If this step used a"
        " parameter before its module ran, on a code path the first step did not take, pass"
        " `PDASGDStrategy(lazy_reads=False)` to read every layer when the step starts."
    )
