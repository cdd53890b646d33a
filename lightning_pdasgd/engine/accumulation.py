"""Gradient accumulation (``Trainer(accumulate_grad_batches=N)``, ``GradientAccumulationScheduler``) under
asynchronous updates.

Lightning decides which batches accumulate: it calls the strategy's ``optimizer_step`` only for the batch that
closes a window (every N-th batch, and the epoch's last) and runs the other batches' closures directly, after
dividing each loss by N. So each hand-off joins the open window, and the one made inside ``optimizer_step`` closes
it. Every backward contributes each bucket's gradients to its window (from the bucket's gradient hook, or at the
backward's end for a bucket it left without gradients). A bucket is stepped once, with the sum, when its window is
closed and all of the window's backwards have contributed: the gradient a plain run accumulates in ``.grad``.
Updates of other windows may land between a window's forwards; its staleness counts from the oldest read among
them. Lightning's step count, schedulers and logging see one optimizer step per window, as in a plain run.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from torch import Tensor

from lightning_pdasgd.engine import cuda_streams

Grads = list[Tensor | None]


@dataclass(eq=False)
class _BucketSum:
    grads: Grads
    contributions: int = 0
    read_version: int = -1  # the oldest version among the contributions' reads (-1: none read it)


@dataclass(eq=False)
class AccumulationWindow:
    """The backwards whose gradients make one optimizer step."""

    members: int = 0
    closed: bool = False
    sums: dict[int, _BucketSum] = field(default_factory=dict)


@dataclass
class ReadySum:
    """A bucket whose window is complete: the summed gradients and the version its staleness counts from."""

    index: int
    grads: Grads
    read_version: int


class GradientWindows:
    """The open window and the sums of every window whose backwards are still running."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open = AccumulationWindow()

    def join(self, closes: bool) -> AccumulationWindow:
        """A loss is handed off (loop thread): its backward contributes to the returned window. ``closes``: the
        hand-off was made inside ``optimizer_step``, so the window is complete once its backwards are."""
        with self._lock:
            window = self._open
            window.members += 1
            if closes:
                window.closed = True
                self._open = AccumulationWindow()
            return window

    def discard(self) -> None:
        """Forget every sum (drained: no backward is running; the weights were restored)."""
        with self._lock:
            self._open = AccumulationWindow()

    def close_without_member(self) -> list[ReadySum]:
        """The loss that would close the open window was dropped (a non-finite loss skipped): close the window
        anyway; returns the buckets that are complete already (to step now)."""
        with self._lock:
            window = self._open
            window.closed = True
            self._open = AccumulationWindow()
            complete = [index for index, total in window.sums.items() if total.contributions == window.members]
            return [self._take(window, index) for index in complete]

    def contribute(self, window: AccumulationWindow, index: int, grads: Grads, read_version: int) -> ReadySum | None:
        """Add one backward's gradients of bucket ``index`` (``None`` where it produced none); the sum once the
        window is complete for this bucket, else ``None``. CUDA: runs on the update stream (the caller's)."""
        with self._lock:
            total = window.sums.get(index)
            if total is None:
                total = window.sums[index] = _BucketSum([None] * len(grads))
            present = [grad for grad in grads if grad is not None]
            cuda_streams.record_on_current(present)  # CUDA: produced on the backward's stream, summed and freed here
            for position, grad in enumerate(grads):
                if grad is None:
                    continue
                held = total.grads[position]
                if held is not None:
                    held.add_(grad)
                else:  # CUDA: a copy allocated on this stream (the backward's allocator may reuse the gradient's)
                    total.grads[position] = grad.clone() if grad.is_cuda else grad
            total.contributions += 1
            if read_version >= 0:
                total.read_version = read_version if total.read_version < 0 else min(total.read_version, read_version)
            if not (window.closed and total.contributions == window.members):
                return None
            return self._take(window, index)

    @staticmethod
    def _take(window: AccumulationWindow, index: int) -> ReadySum:
        total = window.sums.pop(index)
        return ReadySum(index, total.grads, total.read_version)
