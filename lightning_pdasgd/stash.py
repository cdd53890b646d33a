"""Weight stashes: the private copy of the weights that one forward reads.

Why: a forward's graph saves the parameters it read. Updating them in place before its backward runs either
breaks autograd ("modified by an inplace operation") or silently mixes old and new weights. Each forward therefore
reads a private clone, and its backward computes the exact gradient at those weights: the stale gradient that
asynchronous SGD theory assumes. The clone's leaves are private to one backward, so concurrent backwards never
share a gradient buffer.

The leaves are recycled (one set per forward in flight) and their gradient hooks are registered once, so a step
costs one foreach copy per bucket, not new tensors and new hooks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor

from lightning_pdasgd import streams
from lightning_pdasgd.metrics import BackwardRecord
from lightning_pdasgd.parameters import ParameterBucket

GradientHook = Callable[["StashBuffers", int, int], None]


@dataclass(eq=False)
class StashBuffers:
    """One set of leaf tensors (per bucket) that receives a forward's copy of the weights."""

    tensors: dict[str, Tensor] = field(default_factory=dict)  # by parameter name, for reparametrization
    leaves: list[list[Tensor]] = field(default_factory=list)  # by bucket
    arrived: list[int] = field(default_factory=list)  # gradients accumulated so far, by bucket
    current: WeightStash | None = None


@dataclass(eq=False)
class WeightStash:
    """The weights one forward read: private leaves and the version of each bucket at read time."""

    buffers: StashBuffers
    versions: list[int]
    record: BackwardRecord = field(default_factory=BackwardRecord)
    hyperparameters: list[dict[str, Any]] | None = None  # per param group, snapshot at hand-off
    step: int = -1  # Lightning's global_step when the forward ran, for error messages
    rank: int = 0
    ready: Any = None  # CUDA: event after the stash copies (the forward's stream waits for it)

    @property
    def tensors(self) -> dict[str, Tensor]:
        return self.buffers.tensors

    @property
    def leaves(self) -> list[Tensor]:
        """Every leaf, for ``torch.autograd.backward(..., inputs=...)``."""
        return [leaf for bucket in self.buffers.leaves for leaf in bucket]


class StashPool:
    """Hands out recycled stash buffers filled with the live weights, one set per forward in flight.

    ``on_gradient(buffers, bucket_index, position)`` is registered as the post-accumulate-grad hook of every leaf
    when ``on_gradient`` is given (layer-wise updates); ``None`` registers no hook (whole-model updates).
    """

    def __init__(
        self, buckets: list[ParameterBucket], on_gradient: GradientHook | None, compensation: Any = None
    ) -> None:
        self._buckets = buckets
        self._on_gradient = on_gradient
        self._compensation = compensation  # a StalenessCompensation, whose `fill` writes the forward's weights
        self._free: list[StashBuffers] = []  # list.append/pop are atomic: no lock needed

    def take(self) -> WeightStash:
        """A stash holding the live weights now, each bucket copied under its lock."""
        buffers = self._free.pop() if self._free else self._new_buffers()
        device = self._buckets[0].device
        streams.before_stash_copy(device)  # CUDA: after a drain, the copies wait for the loop's stream once
        versions = []
        compensation = self._compensation
        for bucket, leaves in zip(self._buckets, buffers.leaves):
            fill = None if compensation is None else partial(compensation.fill, bucket.index)
            versions.append(bucket.read_into(leaves, fill))
        for index in range(len(buffers.arrived)):
            buffers.arrived[index] = 0
        stash = WeightStash(buffers=buffers, versions=versions, ready=streams.copies_ready(device))
        buffers.current = stash
        return stash

    def give_back(self, stash: WeightStash, reusable: bool) -> None:
        """Recycle a stash's leaves once its backward has finished.

        A graph that never ran backward may still hold them (``reusable=False``): those are left to the garbage
        collector.
        """
        buffers = stash.buffers
        buffers.current = None
        if reusable:
            for leaves in buffers.leaves:
                for leaf in leaves:
                    leaf.grad = None
            self._free.append(buffers)

    def _new_buffers(self) -> StashBuffers:
        buffers = StashBuffers()
        for bucket in self._buckets:
            leaves = []
            for position, (name, param) in enumerate(zip(bucket.names, bucket.params)):
                with streams.on_update_stream(param.device, wait=False):  # CUDA: allocated where it is written
                    leaf = torch.empty_like(param, requires_grad=True)
                if self._on_gradient is not None:
                    leaf.register_post_accumulate_grad_hook(_Hook(self._on_gradient, buffers, bucket.index, position))
                buffers.tensors[name] = leaf
                leaves.append(leaf)
            buffers.leaves.append(leaves)
            buffers.arrived.append(0)
        return buffers


class _Hook:
    """A leaf's post-accumulate-grad hook: tells the updater which leaf of which bucket has its gradient."""

    __slots__ = ("_callback", "_buffers", "_bucket", "_position")

    def __init__(self, callback: GradientHook, buffers: StashBuffers, bucket: int, position: int) -> None:
        self._callback, self._buffers, self._bucket, self._position = callback, buffers, bucket, position

    def __call__(self, leaf: Tensor) -> None:
        self._callback(self._buffers, self._bucket, self._position)
