"""Non-finite losses and gradients on CUDA, checked on the device and read by the host without synchronising.

Why: on CUDA, autograd runs every graph's backward nodes -- and so every gradient hook -- on one worker thread per
device (``Engine::start_device_threads`` / ``Engine::ready_queue`` in ``torch/csrc/autograd/engine.cpp``). A host
synchronisation in a hook (``bool(tensor)``) would stall every in-flight backward until the GPU has caught up, once
per bucket. So on CUDA:

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

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_pdasgd.engine import cuda_streams, nonfinite

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


def act_on_device_nonfinite(checks: DeviceNonFinite, policy: str, device: Any, wait: bool) -> int:
    """Act on the non-finite losses/gradients the device counted; returns the gradient tensors skipped.

    Their updates were already skipped or masked on the device; ``"error"`` raises here, ``"skip"`` counts them.
    """
    losses, gradients = checks.poll(wait=wait)
    if not (losses or gradients):
        return 0
    if policy == "error":
        what = "loss" if losses else "gradient"
        raise nonfinite.error(
            f"non-finite {what} on {device} ({losses} loss(es), {gradients} gradient tensor(s)) found by the"
            " on-device check, read without a host synchronisation, so up to a few steps after it happened; the"
            " updates it would have caused were skipped on the device."
        )
    return gradients
