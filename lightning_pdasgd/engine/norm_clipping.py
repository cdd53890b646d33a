"""Clipping by the total norm, one bucket at a time (``Trainer(gradient_clip_val=...)``, algorithm ``"norm"``).

``torch.nn.utils.clip_grad_norm_`` scales a backward's gradients by ``min(1, max_norm / (total + 1e-6))``, and the
total is known only once the backward's last gradient is. Holding every bucket until then gives up the layer-wise
updates: the layers nearest the loss, which a forward running beside the backward reads last, then compute on
weights one update old like every other layer. Measured (digits CNN, SGD momentum 0.9, ``gradient_clip_val=1``,
5 paired seeds, 4 epochs): at lr 0.3 plain 0.945, whole-backward clipping 0.921 with a guard trip in every run,
clipping per bucket 0.964 with none.

Under asynchrony each bucket is therefore clipped when it is stepped, by the total known at that moment: the exact
squared norms of the buckets this backward has stepped so far, and for each bucket still to come its squared norm
from the latest backward that stepped it. The backward's last bucket is clipped by the exact total; the earlier
ones by an estimate that is exact while each layer's gradient norm changes little from one step to the next. Whatever
the estimate, the total used is at least the norm of the buckets already seen, so no bucket's update exceeds
``max_norm``. At one loss in flight nothing is gained by stepping early, and the updater clips a backward's
gradients together at its end, bitwise as a plain step does.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_pdasgd.engine import _torch_internals, cuda_streams

Squares = float | Tensor  # a float on CPU (read already by the non-finite check); a device scalar on CUDA (no sync)


@dataclass
class ClipProgress:
    """How one backward is clipped: together at its end (one loss in flight), or by bucket with the squared norm of
    the buckets it has stepped so far."""

    together: bool
    squares: Squares = 0.0


def squared_norm(tensors: list[Tensor]) -> Tensor:
    """The squared L2 norm of all tensors together, as a float32 scalar on their device (no host read)."""
    return torch.stack(_torch_internals.foreach_norms(tensors)).float().square().sum()


class BucketwiseNormClip:
    """The latest squared gradient norm of every bucket, and the clipping of one bucket by the total known now."""

    def __init__(self, max_norm: float, buckets: int) -> None:
        self.max_norm = max_norm
        self._latest: list[float] = [0.0] * buckets  # by bucket: its squared norm in the latest backward to step it
        self._latest_on_device: Tensor | None = None  # the same on CUDA, one element per bucket
        self._lock = threading.Lock()  # backwards on several threads step different buckets at once

    def clip_(self, progress: ClipProgress, index: int, grads: list[Tensor], squares: Squares) -> None:
        """Scale bucket ``index``'s gradients (squared norm ``squares``) in place for ``progress``'s backward.

        The buckets stepped so far hold this backward's norms and the others their latest, and the total is never
        below what this backward has shown so far (another backward may have stepped a bucket since)."""
        if isinstance(squares, Tensor):
            self._clip_on_device(progress, index, grads, squares)
            return
        with self._lock:
            self._latest[index] = squares
            progress.squares = float(progress.squares) + squares
            total_squares = max(sum(self._latest), progress.squares)  # a fresh sum: no drift over a long run
        coefficient = self.max_norm / (total_squares**0.5 + 1e-6)
        if coefficient < 1.0:
            torch._foreach_mul_(grads, coefficient)

    def _clip_on_device(self, progress: ClipProgress, index: int, grads: list[Tensor], squares: Tensor) -> None:
        """The same on the update stream, with nothing read on the host."""
        with self._lock:
            if self._latest_on_device is None:
                self._latest_on_device = torch.zeros(len(self._latest), dtype=torch.float32, device=squares.device)
            latest = self._latest_on_device
            latest[index] = squares
            progress.squares = squares + progress.squares
            total_squares = torch.maximum(latest.sum(), progress.squares)
        _torch_internals.foreach_scale_to_norm_(grads, self.max_norm, total_squares.sqrt())

    def forget(self, index: int) -> None:
        """Bucket ``index`` got no gradient in a whole backward: expect none from it in the next one either."""
        with self._lock:
            self._latest[index] = 0.0
            latest = self._latest_on_device
            if latest is not None:
                with cuda_streams.on_update_stream(latest.device, wait=False):  # where the clipping reads it
                    latest[index] = 0.0
