"""The session's way to the other replicas (``engine/peers.py``'s ``PeerLink``), over torch.distributed.

The integration builds one per fit with the exchange's process group and settings; the session calls it to make the
replicas identical, to start an exchange over its current buckets (again after a rebuild), and for the one
all-reduce that makes every rank take the same divergence-guard decision.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.optim import Optimizer

from lightning_pdasgd.distributed.replica_exchange import ReplicaExchange
from lightning_pdasgd.engine.parameter_buckets import ParameterBucket


class ReplicaLink:
    """Args:
    group: the exchange thread's own process group.
    device: this rank's device (NCCL reduces tensors on it).
    interval_s: least time between the starts of two exchange rounds.
    timeout_s: the most any wait for a consistent point may take.
    local_batches: this rank's count of trained batches since fit started, summed over the ranks in every round
        (the step count, ``integration/step_accounting.py``).
    merge: how a round combines the ranks' updates (``ReplicaExchange``'s ``merge``).
    """

    def __init__(
        self,
        group: Any,
        device: torch.device,
        interval_s: float,
        timeout_s: float,
        local_batches: Callable[[], int] = lambda: 0,
        merge: str = "mean",
    ) -> None:
        self._group = group
        self._device = device
        self._interval_s = interval_s
        self._timeout_s = timeout_s
        self._local_batches = local_batches
        self._merge = merge

    def make_identical(self, module: nn.Module) -> None:
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=0)

    def connect(
        self,
        buckets: list[ParameterBucket],
        module: nn.Module,
        optimizer: Optimizer,
        on_error: Callable[[BaseException], None],
    ) -> ReplicaExchange:
        return ReplicaExchange(
            buckets,
            module,
            optimizer,
            group=self._group,
            interval_s=self._interval_s,
            timeout_s=self._timeout_s,
            on_error=on_error,
            local_batches=self._local_batches,
            merge=self._merge,
        )

    def any_rank(self, flags: Sequence[bool]) -> list[bool]:
        """One all-reduce (MAX) on the default group, on the device NCCL needs."""
        device = self._device if dist.get_backend() == "nccl" else torch.device("cpu")
        values = torch.tensor([float(flag) for flag in flags], device=device)
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
        return [value > 0 for value in values.tolist()]
