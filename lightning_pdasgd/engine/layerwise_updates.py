"""The update path: a backward's gradients, checked and clipped, applied to the live parameters bucket by bucket.

``layerwise=True`` (PD-ASGD): a bucket is stepped from the post-accumulate-grad hook of its last leaf, i.e. as soon
as the backward pass has produced all of its gradients; one update at a time per bucket (the bucket's lock), none
across buckets. ``layerwise=False`` (the D-ASGD ablation): the gradients of a whole backward are applied together
at its end, under one model-wide lock.

Clipping by norm (``Trainer(gradient_clip_val=..., gradient_clip_algorithm="norm")``, Lightning's default
algorithm) scales one backward's gradients by ``min(1, max_norm / (total_norm + 1e-6))``, as
``torch.nn.utils.clip_grad_norm_`` does in a plain step. At one loss in flight a backward's buckets are held until
its end and clipped together (exact); with more in flight each bucket is clipped when it is stepped, by the total
known then (``norm_clipping.py``), so the updates stay layer-wise. Clipping by value needs no total and is applied
per bucket.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from time import perf_counter
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_pdasgd.engine import _torch_internals, cuda_streams
from lightning_pdasgd.engine.accumulation import GradientWindows, ReadySum
from lightning_pdasgd.engine.bucket_optimizer import BucketOptimizer
from lightning_pdasgd.engine.compensation import StalenessCompensation
from lightning_pdasgd.engine.lazy_reads import LazyReads
from lightning_pdasgd.engine.nonfinite import NonFinitePolicy
from lightning_pdasgd.engine.norm_clipping import BucketwiseNormClip, ClipProgress, squared_norm
from lightning_pdasgd.engine.parameter_buckets import make_buckets
from lightning_pdasgd.engine.weight_stash import StashBuffers, StashPool, WeightStash


class LayerwiseUpdater:
    """Creates weight stashes for forwards and applies their gradients to the live parameters."""

    def __init__(
        self,
        module: nn.Module,
        optimizer: Optimizer,
        layerwise: bool = True,
        clip_value: float | None = None,
        clip_norm: float | None = None,
        accumulate: bool = False,
        log_grad_norm: bool = False,
        nonfinite: str = "error",
        grad_norms: bool = False,
        bucket_numel: int | str = 0,
        detached: frozenset[int] = frozenset(),
        shared: frozenset[int] = frozenset(),
        compensation: StalenessCompensation | None = None,
        lazy_reads: bool = True,
        wait_timeout: float = 600.0,
        one_loss_in_flight: Callable[[], bool] | None = None,
    ) -> None:
        self.optimizer = optimizer
        self.layerwise = layerwise
        self.clip_value = clip_value
        self.clip_norm = clip_norm
        # clipping by norm waits for a backward's end while this says one loss is in flight (None: always)
        self._one_loss_in_flight = one_loss_in_flight or (lambda: True)
        self.windows = GradientWindows() if accumulate else None  # Trainer(accumulate_grad_batches=...)
        self.log_grad_norm = log_grad_norm
        self.grad_norms = grad_norms or log_grad_norm  # gradient norms per backward (metric, divergence guard)
        self._model_lock = threading.Lock()
        self.plain_step_held = False  # several devices: Lightning's own step holds every bucket
        self.compensation = compensation if compensation is not None else StalenessCompensation()
        self.buckets = make_buckets(module, optimizer, bucket_numel, detached, shared)
        self._bucket_sizes = [len(bucket) for bucket in self.buckets]  # read by every gradient hook
        self._optimizers = [BucketOptimizer(optimizer, bucket) for bucket in self.buckets]
        self._bucketwise_clip = (
            BucketwiseNormClip(clip_norm, len(self.buckets)) if clip_norm is not None and layerwise else None
        )
        self._pool = StashPool(self.buckets, self._on_gradient if self.layerwise else None, self.compensation)
        self.reads = LazyReads(module, self.buckets, self._pool, lazy_reads, wait_timeout)
        self.nonfinite = NonFinitePolicy(nonfinite, self.buckets[0].device)

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

    @contextmanager
    def held_for_plain_step(self) -> Iterator[None]:
        """Lightning's own step with several devices: every bucket held (in bucket order; nothing else holds two),
        so the exchange merges between steps, never into weights a step reads or writes. CUDA: the step's stream
        sees the merges queued before it, and merges queued after it see the step. Re-entrant (one loop thread):
        the automatic step's closure runs inside its optimizer step."""
        if self.plain_step_held:
            yield
            return
        self.plain_step_held = True
        with ExitStack() as held:
            held.callback(setattr, self, "plain_step_held", False)
            for bucket in self.buckets:
                held.enter_context(bucket.held())
            if self.buckets:
                cuda_streams.join_update_stream(self.buckets[0].device)
            yield
            if self.buckets:
                cuda_streams.updates_after_current(self.buckets[0].device)

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
        if stash is not None and buffers.arrived[bucket_index] == self._bucket_sizes[bucket_index]:
            if self._bucketwise_clip is not None and self._clip_progress(stash).together:
                return  # clipped with the backward's other gradients at its end (`finish`)
            started = perf_counter()  # `_timed` written out: this runs once per bucket and backward
            try:
                self._bucket_gradients_ready(stash, bucket_index)
            finally:
                stash.record.update_seconds += perf_counter() - started

    def finish(self, stash: WeightStash) -> None:
        """After the backward: apply what is left (every bucket for ``layerwise=False``; with ``layerwise=True``
        only buckets some of whose parameters got no gradient in this backward, and with accumulation every bucket
        that has not contributed to its window yet)."""
        if not self.layerwise or (self._bucketwise_clip is not None and self._clip_progress(stash).together):
            with self._model_lock:
                ready = []
                for index in range(len(self.buckets)):
                    grads = self._take_gradients(stash, index)
                    summed = self._accumulate(stash, index, grads)
                    if summed is not None:
                        ready.append(summed)
                self._timed(stash, self._step_together, stash, ready)
            return
        arrived = stash.buffers.arrived
        for index, bucket in enumerate(self.buckets):
            if arrived[index] < len(bucket) and (arrived[index] > 0 or self.windows is not None):
                self._timed(stash, self._bucket_gradients_ready, stash, index)
            elif arrived[index] == 0 and self._bucketwise_clip is not None:
                self._bucketwise_clip.forget(index)

    def _clip_progress(self, stash: WeightStash) -> ClipProgress:
        """How ``stash``'s backward is clipped by norm, decided at its first complete bucket (the in-flight bound
        changes only while the engine is drained, so never during a backward)."""
        if stash.clip is None:
            stash.clip = ClipProgress(together=self._one_loss_in_flight())
        return stash.clip

    def close_window_without(self, stash: WeightStash) -> None:
        """Accumulation: the loss that closes the window was dropped (never handed to a backward); step the
        buckets whose sums are complete already (``stash``: the dropped forward's, for its step and
        hyperparameters)."""
        if self.windows is None:
            return
        with self._model_lock:
            self._step_together(stash, self.windows.close_without_member())

    def _take_gradients(self, stash: WeightStash, index: int) -> list[Tensor | None]:
        grads: list[Tensor | None] = []
        for leaf in stash.buffers.leaves[index]:
            grads.append(leaf.grad)
            leaf.grad = None
        return grads

    def _accumulate(self, stash: WeightStash, index: int, grads: list[Tensor | None]) -> ReadySum | None:
        """Without accumulation the backward's own gradients; with it, the window's sum once it is complete."""
        if self.windows is None:
            return ReadySum(index, grads, stash.versions[index])
        assert stash.window is not None, "a stash joins its window at hand-off"
        with cuda_streams.on_update_stream(self.buckets[index].device):
            return self.windows.contribute(stash.window, index, grads, stash.versions[index])

    def _bucket_gradients_ready(self, stash: WeightStash, index: int) -> None:
        """``stash``'s backward has accumulated its last gradient of bucket ``index`` (or has ended)."""
        summed = self._accumulate(stash, index, self._take_gradients(stash, index))
        if summed is not None:
            clip = self._clip_progress(stash) if self._bucketwise_clip is not None else None
            self._step_bucket(stash, summed, backward_done_with_bucket=True, clip=clip)

    def _step_together(self, stash: WeightStash, ready: list[ReadySum]) -> None:
        """Whole-backward updates (the caller holds the model lock): clipped by their total norm, then stepped."""
        if self.clip_norm is not None:
            self._clip_by_total_norm(stash, [grad for summed in ready for grad in summed.grads if grad is not None])
        for summed in ready:
            self._step_bucket(stash, summed)

    def _clip_by_total_norm(self, stash: WeightStash, grads: list[Tensor]) -> None:
        """Scale gradients in place as ``clip_grad_norm_`` does (their total 2-norm at most ``clip_norm``).

        The unclipped norm is what ``pdasgd/grad_norm`` and the divergence guard see (a blow-up under clipping
        still shows in it). On CPU a non-finite gradient is left out of the total (the ``nonfinite`` policy acts on
        it next, per bucket); on CUDA nothing is read on the host, so it makes every gradient non-finite, as in
        ``clip_grad_norm_``, and the device checks act on them.
        """
        assert self.clip_norm is not None
        if not grads:
            return
        total = torch.nn.utils.get_total_norm(grads, 2.0)
        if not total.is_cuda:
            if self.nonfinite.checks and not math.isfinite(float(total)):
                grads = [grad for grad in grads if _torch_internals.all_finite([grad])]
                total = torch.nn.utils.get_total_norm(grads, 2.0)
            if self.grad_norms:
                stash.record.grad_sq_sum += float(total) ** 2
        elif self.log_grad_norm:
            stash.record.grad_sq_sum += float(total) ** 2
        _torch_internals.foreach_scale_to_norm_(grads, self.clip_norm, total)

    # ------------------------------------------------------------------------------------------- updates out
    @staticmethod
    def _timed(stash: WeightStash, apply: Callable[..., None], *args: Any) -> None:
        """Run an update and add its time to the backward's record."""
        started = perf_counter()
        try:
            apply(*args)
        finally:
            stash.record.update_seconds += perf_counter() - started

    def _step_bucket(
        self, stash: WeightStash, summed: ReadySum, backward_done_with_bucket: bool = False,
        clip: ClipProgress | None = None,
    ) -> None:
        """Step one bucket's live parameters with gradients computed at the weights its forwards read.

        ``clip``: the backward's clipping by norm, applied to this bucket alone (``norm_clipping.py``); ``None``
        where there is none, or where the backward's gradients were clipped together already.

        ``backward_done_with_bucket``: ``stash``'s backward no longer uses the bucket's weights, so the storage it
        read is released to the update (``ParameterBucket.update``), which then writes in place where no other
        forward reads it.

        On CPU the gradients are checked and clipped before the bucket's lock. On CUDA this runs on autograd's
        device thread, where a host synchronisation would stall every in-flight backward: the check, the clipping
        and the update are queued on the update stream, and non-finite gradients are counted and masked on the
        device (``nonfinite.py``). ``log_grad_norm`` still reads the norm on the host there (an opt-in metric).
        """
        index, grads = summed.index, summed.grads
        if all(grad is None for grad in grads):
            return
        bucket = self.buckets[index]
        on_device = bucket.is_cuda
        if on_device:
            present = [grad for grad in grads if grad is not None]
        else:
            present, squares, skipped = self.nonfinite.screen_on_host(
                grads, bucket.names, stash.step, stash.rank, self.grad_norms or clip is not None
            )
            stash.record.skipped += skipped  # "skip": those parameters keep their values, the others are updated
            if not present:
                return
            if self.clip_norm is None or clip is not None:  # else the unclipped total was recorded before the scaling
                stash.record.grad_sq_sum += squares
            if self.clip_value is not None:
                _torch_internals.foreach_clamp_(present, self.clip_value)
            if clip is not None:
                self._clip_bucketwise(clip, index, present, squares)
        assert stash.hyperparameters is not None, "a stash is applied only after its hand-off"
        hyperparameters = stash.hyperparameters[bucket.group_index]
        optimizer = self._optimizers[index]
        read = _weights_read(stash.buffers.leaves[index], bucket.params, grads) if self.compensation.uses_read else ()

        def step(staleness: int, version: int, targets: list[Tensor]) -> None:
            used = present
            if on_device:  # on the update stream
                cuda_streams.record_on_current(present)  # allocated on autograd's stream, read and freed here
                used = self.nonfinite.screen_on_device(present, grads, optimizer)
                if self.clip_value is not None:
                    _torch_internals.foreach_clamp_(used, self.clip_value)
                if self.log_grad_norm and (self.clip_norm is None or clip is not None):
                    stash.record.grad_sq_sum += _torch_internals.sum_of_squares(used)
                if clip is not None and used:
                    self._clip_bucketwise(clip, index, used, squared_norm(used))
            # staleness compensation sees the bucket's staleness, may change the gradients in place and may
            # override hyperparameters for this step only (the next step starts from the snapshot again)
            applied = [target for target, grad in zip(targets, grads) if grad is not None]
            overrides = self.compensation.before_step(index, applied, used, read, staleness, version, hyperparameters)
            stepped = {**hyperparameters, **overrides} if overrides else hyperparameters
            optimizer.step(grads, stepped, targets)
            if self.compensation.uses_velocity:
                every = len(present) == len(grads)  # a velocity only where every parameter moved
                self.compensation.observe_velocity(index, optimizer.heavy_ball_velocity(stepped) if every else None)

        finished_read = None
        if backward_done_with_bucket and not on_device:
            finished_read, stash.reads[index] = stash.reads[index], None
        staleness = bucket.update(summed.read_version, step, finished_read)
        self._count_update(stash, index, staleness, len(present))

    def _clip_bucketwise(self, clip: ClipProgress, index: int, grads: list[Tensor], squares: float | Tensor) -> None:
        assert self._bucketwise_clip is not None
        self._bucketwise_clip.clip_(clip, index, grads, squares)

    def _count_update(self, stash: WeightStash, index: int, staleness: int, parameters: int) -> None:
        record = stash.record
        record.add_update(staleness, parameters)
        order = self.reads.forward_order
        if index == order[0]:
            record.add_depth(record.first_bucket, staleness)
        if index == order[-1]:
            record.add_depth(record.last_bucket, staleness)


def _weights_read(leaves: list[Tensor], params: list[nn.Parameter], grads: list[Tensor | None]) -> list[Tensor]:
    """The weights the stepping backward's forward read, per parameter with a gradient (computed outside the
    bucket's lock); the live parameter where it read none (accumulation: the gradient came from another forward
    of the window)."""
    return [
        leaf if leaf.shape == param.shape else param.detach()
        for leaf, param, grad in zip(leaves, params, grads)
        if grad is not None
    ]
