"""The ``nonfinite`` policy, its one owner: what a NaN/Inf loss or gradient does, for the loss, the gradients and
the on-device checks.

``"error"`` (the default) stops fit with ``NonFiniteError`` naming the step, ``"skip"`` drops the update and counts
it in ``pdasgd/skipped_updates``, ``"off"`` checks nothing (the values reach the optimizer, as in plain Lightning).
``NonFinitePolicy`` checks the loss at hand-off (the session) and each bucket's gradients before its update (the
updater); on CUDA both are checked on the device (``DeviceNonFinite``).

On the device, why and how: on CUDA, autograd runs every graph's backward nodes -- and so every gradient hook -- on
one worker thread per device (``Engine::start_device_threads`` / ``Engine::ready_queue`` in
``torch/csrc/autograd/engine.cpp``). A host synchronisation in a hook (``bool(tensor)``) would stall every in-flight
backward until the GPU has caught up, once per bucket. So on CUDA:

- each bucket's gradients are checked with one max-abs reduction per tensor (``_foreach_norm(ord=inf)``, exact:
  NaN propagates and any Inf gives Inf), on the update stream, and the count of bad tensors is added to a device
  counter;
- the bucket's update is skipped *on the device*: fused optimizers (``fused=True`` SGD/Adam/AdamW/Adagrad) get
  torch's own ``found_inf`` (the AMP mechanism: no parameter, state or step counter moves); other optimizers get
  the non-finite gradients replaced by zeros (``torch.where``), so the parameter moves only by what the optimizer
  does with a zero gradient (momentum, weight decay);
- the loss is checked the same way on the loop thread's stream;
- the loop thread copies both counters to pinned host memory asynchronously once per step and looks at the copy
  when its event has completed (``Event.query``): errors are raised, or skips counted, a step or two late in steady
  state, and exactly at every drain (validation, checkpoints, epoch and fit end), where synchronising is allowed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lightning_pdasgd.engine import _torch_internals, cuda_streams
from lightning_pdasgd.errors import NonFiniteError

if TYPE_CHECKING:
    from lightning_pdasgd.engine.bucket_optimizer import BucketOptimizer

POLICIES = ("error", "skip", "off")

SKIP_ADVICE = (
    "Pass `PDASGDStrategy(nonfinite='skip')` to drop such updates and count them in `pdasgd/skipped_updates` instead."
)


def validate(policy: str) -> str:
    """``policy`` if it is one of ``POLICIES``; else a ``ValueError`` naming the setting."""
    if policy not in POLICIES:
        raise ValueError(f"PDASGDStrategy: `nonfinite` must be one of {POLICIES}, got {policy!r}.")
    return policy


def error(what: str) -> NonFiniteError:
    """The error for a non-finite value found (``what`` says which, where and when), with the skip advice."""
    return NonFiniteError(f"PD-ASGD: {what} {SKIP_ADVICE}")


def host_loss_value(loss: Tensor) -> float | None:
    """A one-element CPU loss's value, read once per step for the non-finite check and the divergence guard (each
    read gives the GIL up and takes it back from busy threads); ``None`` on CUDA or for a loss of several elements."""
    return loss.item() if not loss.is_cuda and loss.numel() == 1 else None


class NonFinitePolicy:
    """The policy of one fit on one device: checks losses and gradients, raises or says what to skip.

    Args:
        policy: ``"error"``, ``"skip"`` or ``"off"``.
        device: the parameters' device; on CUDA the checks run on the device (``DeviceNonFinite``).
    """

    def __init__(self, policy: str, device: torch.device) -> None:
        self.policy = validate(policy)
        self.checks = policy != "off"
        # CUDA: non-finite values are counted on the device and read lazily, never in a hook
        self.device = DeviceNonFinite(device) if device.type == "cuda" and self.checks else None

    # ------------------------------------------------------------------------------------------- the loss
    def loss_usable(self, loss: Tensor, step: int, rank: int, host_value: float | None = None) -> bool:
        """Whether a loss may be handed to a backward: raises under ``"error"``; ``False`` means skip it.
        ``host_value``: a one-element CPU loss's value, where the caller has read it already.

        On CUDA the loss is counted on the device (its non-finite gradients are masked later) and always usable.
        """
        if loss.is_cuda and self.device is not None:
            self.device.note_loss(loss)
            return True
        if not self.checks:
            return True
        value = loss.detach()
        if host_value is not None and value.numel() == 1:
            finite = math.isfinite(host_value)
        else:
            finite = math.isfinite(value.item()) if value.numel() == 1 else bool(torch.isfinite(value).all())
        if finite:
            return True  # (one read of a scalar loss: a few kernels less than `isfinite(...).all()` per step)
        if self.policy == "error":
            raise error(
                f"non-finite loss ({float(loss.detach())}) at step {step} on rank {rank}; no update was applied"
                " from it."
            )
        return False

    # ------------------------------------------------------------------------------------------- gradients
    def screen_on_host(
        self, grads: list[Tensor | None], names: Sequence[str], step: int, rank: int, need_squares: bool
    ) -> tuple[list[Tensor], float, int]:
        """CPU: one bucket's gradients before its update; returns the ones to apply, their squared norm and how
        many were skipped. A skipped gradient is set to ``None`` in ``grads`` (its parameter keeps its value).

        One L2 reduction per tensor serves the check, ``pdasgd/grad_norm`` and the divergence guard.
        """
        present = [grad for grad in grads if grad is not None]
        squares = _torch_internals.sum_of_squares(present) if self.checks or need_squares else 0.0
        if not self.checks or math.isfinite(squares) or _torch_internals.all_finite(present):
            return present, squares, 0
        bad = [i for i, grad in enumerate(grads) if grad is not None and not _torch_internals.all_finite([grad])]
        if self.policy == "error":
            raise error(f"non-finite gradient for parameter '{names[bad[0]]}' at step {step} on rank {rank}; it was"
                        " not applied.")
        for position in bad:
            grads[position] = None
        present = [grad for grad in grads if grad is not None]
        return present, (_torch_internals.sum_of_squares(present) if present else 0.0), len(bad)

    def screen_on_device(
        self, present: list[Tensor], grads: list[Tensor | None], optimizer: BucketOptimizer
    ) -> list[Tensor]:
        """CUDA, on the update stream: count non-finite gradients and skip them on the device, no host sync.

        Fused optimizers get torch's own ``found_inf``; others get the non-finite gradients replaced by zeros (also in
        ``grads``). Returns the gradients to apply.
        """
        if self.device is None:
            return present
        finite = self.device.finite_mask(present)
        if optimizer.supports_found_inf:
            optimizer.set_found_inf(torch.logical_not(finite.all()).float())
            return present
        used = [torch.where(finite[i], grad, 0) for i, grad in enumerate(present)]
        used_iter = iter(used)
        grads[:] = [None if grad is None else next(used_iter) for grad in grads]
        return used

    def act_on_device(self, wait: bool) -> int:
        """CUDA: act on the non-finite losses/gradients the device counted; returns the gradient tensors skipped.

        Their updates were already skipped or masked on the device; ``"error"`` raises here, ``"skip"`` counts them.
        ``wait=True`` (at a drain) sees everything queued before.
        """
        if self.device is None:
            return 0
        losses, gradients = self.device.poll(wait=wait)
        if not (losses or gradients):
            return 0
        if self.policy == "error":
            what = "loss" if losses else "gradient"
            raise error(
                f"non-finite {what} on {self.device.device} ({losses} loss(es), {gradients} gradient tensor(s))"
                " found by the on-device check, read without a host synchronisation, so up to a few steps after it"
                " happened; the updates it would have caused were skipped on the device."
            )
        return gradients


_INF = float("inf")


class DeviceNonFinite:
    """Device-side counters of non-finite losses and gradient tensors, polled by the loop thread."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._losses = torch.zeros((), dtype=torch.int64, device=device)  # written on the loop thread's stream
        self._gradients = torch.zeros((), dtype=torch.int64, device=device)  # written on the update stream
        self._host = torch.zeros(2, dtype=torch.int64, pin_memory=True)
        self._events: tuple[torch.cuda.Event, torch.cuda.Event] | None = None
        self._seen = (0, 0)

    def note_loss(self, loss: Tensor) -> None:
        """Count a non-finite loss (queued on the current stream, no host sync)."""
        self._losses.add_(torch.logical_not(torch.isfinite(loss.detach())).any())

    def finite_mask(self, grads: Sequence[Tensor]) -> Tensor:
        """One bool per gradient tensor (all elements finite), counted; runs on the update stream."""
        norms = torch.stack([norm.float() for norm in torch._foreach_norm(list(grads), _INF)])
        finite = torch.isfinite(norms)
        self._gradients.add_(torch.logical_not(finite).sum())
        return finite

    def poll(self, wait: bool = False) -> tuple[int, int]:
        """New non-finite (losses, gradient tensors) since the last poll that the host can see now.

        ``wait=False`` (steady state): looks only at a copy whose events have completed, then queues the next one.
        ``wait=True`` (at a drain): waits for a fresh copy, so nothing queued before is missed.
        """
        new = (0, 0)
        if self._events is not None and (wait or all(event.query() for event in self._events)):
            if wait:
                for event in self._events:
                    event.synchronize()
            new = self._take()
            self._events = None
        if self._events is None:
            self._queue_copy()
            if wait:
                for event in self._events:  # type: ignore[union-attr]
                    event.synchronize()
                fresh = self._take()
                new = (new[0] + fresh[0], new[1] + fresh[1])
                self._events = None
        return new

    def _take(self) -> tuple[int, int]:
        losses, gradients = (int(value) for value in self._host.tolist())
        new = (losses - self._seen[0], gradients - self._seen[1])
        self._seen = (losses, gradients)
        return new

    def _queue_copy(self) -> None:
        current = torch.cuda.current_stream(self.device)
        self._host[0].copy_(self._losses, non_blocking=True)
        loss_event = torch.cuda.Event()
        loss_event.record(current)
        with cuda_streams.on_update_stream(self.device, wait=False):
            self._host[1].copy_(self._gradients, non_blocking=True)
            gradient_event = torch.cuda.Event()
            gradient_event.record()
        self._events = (loss_event, gradient_event)
