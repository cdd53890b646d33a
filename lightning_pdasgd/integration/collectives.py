"""Collectives of the default process group that act locally while the ranks train at their own pace.

Lightning calls ``barrier``, ``broadcast``, ``reduce`` and ``all_gather`` from the loop thread (``sync_dist``
logging, callbacks, checkpoint paths). Between two consistent points PD-ASGD ranks are at different steps, so a
collective there would make every rank wait for the slowest one -- or deadlock when ranks call different ones.
While training is asynchronous these act on this rank's value alone; at consistent points (where every rank
meets) and outside fit they are Lightning's own.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch import Tensor
from typing_extensions import override

from . import _lightning_internals
from ._lightning_internals import distributed_is_initialized as _distributed_is_initialized


class AsyncAwareCollectives:
    """A mixin for a ``ParallelStrategy``: ``_asynchronous`` tells whether ranks run at their own pace now."""

    @property
    def _asynchronous(self) -> bool:
        """Overridden by the strategy; without a running engine every rank is in step."""
        return False

    @override
    def barrier(self, *args: Any, **kwargs: Any) -> None:
        if _distributed_is_initialized() and not self._asynchronous:
            torch.distributed.barrier()

    @override
    def broadcast(self, obj: Any, src: int = 0) -> Any:
        if not _distributed_is_initialized() or self._asynchronous:
            return obj
        container = [obj]
        torch.distributed.broadcast_object_list(container, src)
        return container[0]

    @override
    def reduce(self, tensor: Any, group: Optional[Any] = None, reduce_op: Optional[Union[str, Any]] = "mean") -> Any:
        if isinstance(tensor, Tensor) and not self._asynchronous:
            return _lightning_internals.sync_ddp_if_available(tensor, group, reduce_op=reduce_op)
        return tensor

    @override
    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        if self._asynchronous:
            return decision
        return super().reduce_boolean_decision(decision, all=all)  # type: ignore[misc]

    @override
    def all_gather(self, tensor: Tensor, group: Optional[Any] = None, sync_grads: bool = False) -> Tensor:
        if self._asynchronous:
            return tensor.unsqueeze(0)
        return super().all_gather(tensor, group=group, sync_grads=sync_grads)  # type: ignore[misc]
