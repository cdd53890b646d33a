"""The update path: a backward's gradients, checked and clipped, applied to the live parameters bucket by bucket.

``layerwise=True`` (PD-ASGD): a bucket is stepped from the post-accumulate-grad hook of its last leaf, i.e. as soon
as the backward pass has produced all of its gradients; one update at a time per bucket (the bucket's lock), none
across buckets. ``layerwise=False`` (the D-ASGD ablation): the gradients of a whole backward are applied together
at its end, under one model-wide lock.
"""

from __future__ import annotations

import math
import threading
from contextlib import AbstractContextManager
from time import perf_counter

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_pdasgd import _internals, streams
from lightning_pdasgd.compensation import StalenessCompensation
from lightning_pdasgd.device_checks import DeviceNonFinite
from lightning_pdasgd.optimizers import BucketOptimizer
from lightning_pdasgd.parameters import make_buckets
from lightning_pdasgd.reads import LazyReads
from lightning_pdasgd.stash import StashBuffers, StashPool, WeightStash

NONFINITE_POLICIES = ("error", "skip", "off")


class NonFiniteError(FloatingPointError):
    """A loss or gradient was NaN or Inf; the update it would have caused was not applied."""


class LayerwiseUpdater:
    """Creates weight stashes for forwards and applies their gradients to the live parameters."""

    def __init__(
        self,
        module: nn.Module,
        optimizer: Optimizer,
        layerwise: bool = True,
        clip_value: float | None = None,
        log_grad_norm: bool = False,
        nonfinite: str = "error",
        grad_norms: bool = False,
        bucket_numel: int = 0,
        detached: frozenset[int] = frozenset(),
        shared: frozenset[int] = frozenset(),
        compensation: StalenessCompensation | None = None,
        lazy_reads: bool = True,
    ) -> None:
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"`nonfinite` must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
        self.nonfinite = nonfinite
        self.optimizer = optimizer
        self.layerwise = layerwise
        self.clip_value = clip_value
        self.log_grad_norm = log_grad_norm
        self.grad_norms = grad_norms or log_grad_norm  # gradient norms per backward (metric, divergence guard)
        self._model_lock = threading.Lock()
        self.compensation = compensation if compensation is not None else StalenessCompensation()
        self.buckets = make_buckets(module, optimizer, bucket_numel, detached, shared)
        self._optimizers = [BucketOptimizer(optimizer, bucket) for bucket in self.buckets]
        self._pool = StashPool(self.buckets, self._on_gradient if layerwise else None, self.compensation)
        self.reads = LazyReads(module, self.buckets, self._pool, lazy_reads)
        device = self.buckets[0].device
        # CUDA: non-finite values are counted on the device and read lazily (device_checks.py), never in a hook
        self.device_checks = DeviceNonFinite(device) if device.type == "cuda" and nonfinite != "off" else None

    @property
    def num_parameters(self) -> int:
        return sum(len(bucket) for bucket in self.buckets)

    @property
    def versions(self) -> list[int]:
        return [bucket.version for bucket in self.buckets]

    # ------------------------------------------------------------------------------------------- stashes
    def follow_external_storage(self) -> bool:
        """Follow parameters whose storage was replaced from outside since the last forward; whether any was."""
        followed = False
        for bucket in self.buckets:
            followed = bucket.follow_external_storage() or followed
        return followed

    def storage_given_from_outside(self) -> frozenset[int]:
        """Ids of the parameters whose storage came from outside the engine (a rebuild keeps writing it in
        place): followed already, or given since the last forward."""
        return frozenset(id(param) for bucket in self.buckets for param in bucket.given_from_outside())

    def stash(self) -> WeightStash:
        """The leaves of one forward, nothing read yet: run the forward inside ``reading(stash)``."""
        return self._pool.take()

    def reading(self, stash: WeightStash) -> AbstractContextManager[None]:
        """The forward of ``stash`` runs inside: each bucket is read (aliased, no copy) as the forward reaches it."""
        return self.reads.forward(stash)

    def release(self, stash: WeightStash, reusable: bool) -> None:
        """After the backward (``reusable=True``), or for a forward that was never handed off (``False``)."""
        self._pool.give_back(stash, reusable)

    def close(self) -> None:
        """Remove the read hooks from the user's modules (end of fit, or a rebuild)."""
        self.reads.close()

    # ------------------------------------------------------------------------------------------- gradients in
    def _on_gradient(self, buffers: StashBuffers, bucket_index: int, position: int) -> None:
        """A leaf's gradient is ready; step its bucket once the bucket's last gradient is."""
        buffers.arrived[bucket_index] += 1
        stash = buffers.current
        if stash is not None and buffers.arrived[bucket_index] == len(self.buckets[bucket_index]):
            self._apply_bucket(stash, bucket_index)

    def finish(self, stash: WeightStash) -> None:
        """After the backward: apply what is left (every bucket for ``layerwise=False``; with ``layerwise=True``
        only buckets some of whose parameters got no gradient in this backward)."""
        if not self.layerwise:
            with self._model_lock:
                for index in range(len(self.buckets)):
                    self._apply_bucket(stash, index)
            return
        arrived = stash.buffers.arrived
        for index, bucket in enumerate(self.buckets):
            if 0 < arrived[index] < len(bucket):
                self._apply_bucket(stash, index)

    # ------------------------------------------------------------------------------------------- updates out
    def _apply_bucket(self, stash: WeightStash, index: int) -> None:
        """Step one bucket's live parameters with the gradients computed at the stashed weights."""
        started = perf_counter()
        try:
            self._step_bucket(stash, index)
        finally:
            stash.record.update_seconds += perf_counter() - started

    def _step_bucket(self, stash: WeightStash, index: int) -> None:
        leaves = stash.buffers.leaves[index]
        grads: list[Tensor | None] = []
        for leaf in leaves:
            grads.append(leaf.grad)
            leaf.grad = None
        present = [grad for grad in grads if grad is not None]
        if not present:
            return
        bucket = self.buckets[index]
        if bucket.is_cuda:
            self._step_bucket_cuda(stash, index, grads, present)
            return
        # one L2 reduction per tensor serves the non-finite check, `pdasgd/grad_norm` and the divergence guard
        squares = _internals.sum_of_squares(present) if self.nonfinite != "off" or self.grad_norms else 0.0
        if self.nonfinite != "off" and not math.isfinite(squares) and not _internals.all_finite(present):
            bad = [position for position, grad in enumerate(grads) if grad is not None and not _internals.all_finite([grad])]
            if self.nonfinite == "error":
                raise NonFiniteError(
                    f"PD-ASGD: non-finite gradient for parameter '{bucket.names[bad[0]]}' at step {stash.step} on"
                    f" rank {stash.rank}; it was not applied. Pass `PDASGDStrategy(nonfinite='skip')` to drop such"
                    " updates and count them in `pdasgd/skipped_updates` instead."
                )
            stash.record.skipped += len(bad)  # "skip": those parameters keep their values, the others are updated
            for position in bad:
                grads[position] = None
            present = [grad for grad in grads if grad is not None]
            if not present:
                return
            squares = _internals.sum_of_squares(present)
        stash.record.grad_sq_sum += squares
        if self.clip_value is not None:
            _internals.foreach_clamp_(present, self.clip_value)
        assert stash.hyperparameters is not None, "a stash is applied only after its hand-off"
        hyperparameters = stash.hyperparameters[bucket.group_index]
        optimizer = self._optimizers[index]
        read = [leaf for leaf, grad in zip(leaves, grads) if grad is not None]

        def step(staleness: int, version: int, targets: list[Tensor]) -> None:
            # staleness compensation sees the bucket's staleness, may change the gradients in place and may
            # override hyperparameters for this step only (the next step starts from the snapshot again)
            applied = [target for target, grad in zip(targets, grads) if grad is not None]
            overrides = self.compensation.before_step(index, applied, present, read, staleness, version,
                                                      hyperparameters)
            optimizer.step(grads, {**hyperparameters, **overrides} if overrides else hyperparameters, targets)

        staleness = bucket.update(stash.versions[index], step)
        self._count_update(stash, index, staleness, len(present))

    def _count_update(self, stash: WeightStash, index: int, staleness: int, parameters: int) -> None:
        record = stash.record
        record.add_update(staleness, parameters)
        order = self.reads.forward_order
        if index == order[0]:
            record.add_depth(record.first_bucket, staleness)
        if index == order[-1]:
            record.add_depth(record.last_bucket, staleness)

    # ------------------------------------------------------------------------------------------- CUDA
    def _step_bucket_cuda(
        self, stash: WeightStash, index: int, grads: list[Tensor | None], present: list[Tensor]
    ) -> None:
        """The CUDA update of one bucket: no host synchronisation (it runs on autograd's device thread, where a
        sync would stall every in-flight backward). Non-finite gradients are counted and masked on the device
        (``device_checks.py``); the error or skip is reported by the loop thread. ``log_grad_norm`` still reads
        the norm on the host (an opt-in metric)."""
        bucket = self.buckets[index]
        assert stash.hyperparameters is not None, "a stash is applied only after its hand-off"
        hyperparameters = stash.hyperparameters[bucket.group_index]
        optimizer = self._optimizers[index]
        leaves = stash.buffers.leaves[index]
        read = [leaf for leaf, grad in zip(leaves, grads) if grad is not None]
        checks = self.device_checks

        def step(staleness: int, version: int, targets: list[Tensor]) -> None:  # on the update stream
            streams.record_on_current(present)  # allocated on autograd's stream, read and freed here
            used = present
            if checks is not None:
                finite = checks.finite_mask(present)
                if optimizer.supports_found_inf:
                    optimizer.set_found_inf(torch.logical_not(finite.all()).float())
                else:
                    used = [torch.where(finite[i], grad, 0) for i, grad in enumerate(present)]
                    used_iter = iter(used)
                    grads[:] = [None if grad is None else next(used_iter) for grad in grads]
            if self.clip_value is not None:
                _internals.foreach_clamp_(used, self.clip_value)
            if self.log_grad_norm:
                stash.record.grad_sq_sum += _internals.sum_of_squares(used)
            applied = [target for target, grad in zip(targets, grads) if grad is not None]
            overrides = self.compensation.before_step(index, applied, used, read, staleness, version, hyperparameters)
            optimizer.step(grads, {**hyperparameters, **overrides} if overrides else hyperparameters, targets)

        staleness = bucket.update(stash.versions[index], step)
        self._count_update(stash, index, staleness, len(present))
