"""Weight stashes: the leaves through which one forward reads the weights, and what each bucket's leaves point at.

Why: a forward's graph saves the parameters it read. Updating them in place before its backward runs either
breaks autograd ("modified by an inplace operation") or silently mixes old and new weights. Each forward therefore
reads through private leaf tensors: each leaf aliases the storage of the version it read (the bucket writes
copy-on-write, ``parameter_buckets.py``, so that storage stays as read until the backward is done with it), and its
backward computes the exact gradient at those weights -- the stale gradient that asynchronous SGD theory assumes. The
leaves' ``.grad`` are private to one backward, so concurrent backwards never share a gradient buffer.

A bucket is read when the forward reaches it (``lazy_reads.py``), not when the step starts. Until then its leaves point
at an empty placeholder, so a use that the first step's detection missed fails loudly instead of reading an older
forward's weights. Where the compensation predicts weights, the leaves point at a private copy it wrote.

The leaves are recycled (one set per forward in flight) and their gradient hooks are registered once, so a read
costs re-pointing a few tensors, not a copy, new tensors or new hooks.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Optional

import torch
from torch import Tensor

from lightning_pdasgd.engine import _torch_internals, cuda_streams
from lightning_pdasgd.engine.accumulation import AccumulationWindow
from lightning_pdasgd.engine.compensation import StalenessCompensation
from lightning_pdasgd.engine.metrics import BackwardRecord
from lightning_pdasgd.engine.norm_clipping import ClipProgress
from lightning_pdasgd.engine.parameter_buckets import ParameterBucket, WeightVersion

GradientHook = Callable[["StashBuffers", int, int], None]
UNREAD = -1  # the version of a bucket the forward has not read (yet)


@dataclass(eq=False)
class StashBuffers:
    """One set of leaf tensors (per bucket) through which a forward reads the weights."""

    tensors: dict[str, Tensor] = field(default_factory=dict)  # by parameter name, for reparametrization
    leaves: list[list[Tensor]] = field(default_factory=list)  # by bucket
    arrived: list[int] = field(default_factory=list)  # gradients accumulated so far, by bucket
    private: list[Optional[list[Tensor]]] = field(default_factory=list)  # predicted weights, by bucket (lazily)
    current: WeightStash | None = None
    swap: Optional[_torch_internals.ParameterSwap] = None  # the leaves' places in the module (found once)

    def swapped_into(self, module: torch.nn.Module) -> AbstractContextManager[None]:
        """The forward runs inside: the module's parameters are these leaves (tied weights stay tied)."""
        if self.swap is None:
            self.swap = _torch_internals.ParameterSwap(module, self.tensors)
        return self.swap.applied()


@dataclass(eq=False)
class WeightStash:
    """The weights one forward read: its leaves, and per bucket the version and the storage it read."""

    buffers: StashBuffers
    versions: list[int]  # UNREAD for a bucket the forward never reached
    reads: list[Optional[WeightVersion]]  # the live storage each bucket aliased (None: unread or a private copy)
    record: BackwardRecord = field(default_factory=BackwardRecord)
    hyperparameters: list[dict[str, Any]] | None = None  # per param group, snapshot at hand-off
    step: int = -1  # Lightning's global_step when the forward ran, for error messages
    rank: int = 0
    number: int | None = None  # the batch's place in forward order (``completion.py``)
    window: AccumulationWindow | None = None  # with gradient accumulation: the window its backward adds to
    clip: ClipProgress | None = None  # clipping by norm: how its backward clips, decided at its first bucket

    @property
    def tensors(self) -> dict[str, Tensor]:
        return self.buffers.tensors

    @property
    def leaves(self) -> list[Tensor]:
        """Every leaf, for ``torch.autograd.backward(..., inputs=...)``."""
        return [leaf for bucket in self.buffers.leaves for leaf in bucket]

    def leaf_buckets(self) -> dict[int, int]:
        """Each leaf's bucket, by the leaf's ``id`` (for finding parameters used before their module runs)."""
        return {id(leaf): index for index, leaves in enumerate(self.buffers.leaves) for leaf in leaves}


class StashPool:
    """Hands out recycled leaf sets, one per forward in flight, and points each bucket's leaves at what it reads.

    ``on_gradient(buffers, bucket_index, position)`` is registered as the post-accumulate-grad hook of every leaf
    when ``on_gradient`` is given (layer-wise updates); ``None`` registers no hook (whole-model updates).
    """

    def __init__(
        self,
        buckets: list[ParameterBucket],
        on_gradient: GradientHook | None,
        compensation: StalenessCompensation | None = None,
    ) -> None:
        self._buckets = buckets
        self._on_gradient = on_gradient
        self._compensation = compensation
        self._free: list[StashBuffers] = []  # list.append/pop are atomic: no lock needed
        self._placeholders: dict[tuple[torch.dtype, torch.device], Tensor] = {}

    def take(self) -> WeightStash:
        """A stash whose buckets are all unread."""
        buffers = self._free.pop() if self._free else self._new_buffers()
        for index in range(len(buffers.arrived)):
            buffers.arrived[index] = 0
        count = len(self._buckets)
        stash = WeightStash(buffers=buffers, versions=[UNREAD] * count, reads=[None] * count)
        buffers.current = stash
        return stash

    def read(self, stash: WeightStash, index: int) -> None:
        """The forward reaches bucket ``index``: its leaves alias the live storage, or a predicted copy."""
        if stash.versions[index] != UNREAD:
            return
        bucket = self._buckets[index]
        leaves = stash.buffers.leaves[index]
        compensation = self._compensation
        if compensation is not None and compensation.wants_fill(index, bucket.version):
            private = stash.buffers.private[index]
            if private is None:
                with cuda_streams.on_update_stream(bucket.device, wait=False):  # CUDA: allocated where it is written
                    private = [torch.empty_like(tensor) for tensor in bucket.aliases]
                stash.buffers.private[index] = private
            cuda_streams.before_stash_copy(bucket.device)
            stash.versions[index] = bucket.read_into(private, partial(compensation.fill, index))
            cuda_streams.read_after_updates(bucket.device, private)
            for leaf, tensor in zip(leaves, private):
                leaf.data = tensor
            return
        read, version = bucket.read()
        stash.reads[index] = read
        stash.versions[index] = version
        for leaf, tensor in zip(leaves, read.tensors):
            leaf.data = tensor

    def give_back(self, stash: WeightStash, reusable: bool) -> None:
        """The forward's graph is gone (its backward ran, ``reusable=True``) or was never handed off.

        Each storage the forward aliased is released to its bucket. Leaves whose graph may still live
        (``reusable=False``) are left to the garbage collector, and the storage they alias is never written again.
        """
        buffers = stash.buffers
        buffers.current = None
        for index, read in enumerate(stash.reads):
            if read is not None:
                self._buckets[index].release(read, reusable)
        if not reusable:
            return
        for index, leaves in enumerate(buffers.leaves):
            if stash.versions[index] == UNREAD:
                continue
            for leaf in leaves:
                leaf.grad = None
                leaf.data = self._placeholder(leaf)
        self._free.append(buffers)

    def _placeholder(self, leaf: Tensor) -> Tensor:
        key = (leaf.dtype, leaf.device)
        placeholder = self._placeholders.get(key)
        if placeholder is None:
            placeholder = self._placeholders[key] = torch.empty(0, dtype=leaf.dtype, device=leaf.device)
        return placeholder

    def _new_buffers(self) -> StashBuffers:
        buffers = StashBuffers()
        for bucket in self._buckets:
            leaves = []
            for position, (name, param) in enumerate(zip(bucket.names, bucket.params)):
                leaf = torch.empty(0, dtype=param.dtype, device=param.device).requires_grad_(True)
                leaf.data = self._placeholder(leaf)
                if self._on_gradient is not None:
                    leaf.register_post_accumulate_grad_hook(_Hook(self._on_gradient, buffers, bucket.index, position))
                buffers.tensors[name] = leaf
                leaves.append(leaf)
            buffers.leaves.append(leaves)
            buffers.arrived.append(0)
            buffers.private.append(None)
        return buffers


class _Hook:
    """A leaf's post-accumulate-grad hook: tells the updater which leaf of which bucket has its gradient."""

    __slots__ = ("_callback", "_buffers", "_bucket", "_position")

    def __init__(self, callback: GradientHook, buffers: StashBuffers, bucket: int, position: int) -> None:
        self._callback, self._buffers, self._bucket, self._position = callback, buffers, bucket, position

    def __call__(self, leaf: Tensor) -> None:
        self._callback(self._buffers, self._bucket, self._position)
