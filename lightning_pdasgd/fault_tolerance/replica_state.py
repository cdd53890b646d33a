"""How a replica's state moves between replicas in the fault-tolerant mode: to a joining replica (torchft's live
recovery calls ``state_for_peer`` on a healthy replica and ``heal`` on the joining one), and at the start, when every
replica takes the first quorum's lowest one's.

A part of ``FaultTolerantExchange`` (``fault_tolerant_exchange.py``) kept in its own module: it reads and changes
the exchange's state through the attributes annotated below, and nothing else uses it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_pdasgd.distributed.exchange_buffers import FlatGroup
from lightning_pdasgd.engine import _torch_internals
from lightning_pdasgd.engine.parameter_buckets import ParameterBucket

from . import torchft_adapter


class ReplicaStateTransfer:
    """The exchange's side of healing and of the common start."""

    _link: Any
    _groups: list[FlatGroup]
    _buckets: list[ParameterBucket]
    _params: list[nn.Parameter]
    _positions: dict[int, int]
    _module: nn.Module
    _optimizer: Optimizer
    _unsent: list[list[int]]

    def _start_together(self) -> bool:
        """One quorum step. A replica behind the others heals in it (``start_quorum``); if nobody has committed yet,
        every replica takes the lowest participant's parameters, buffers and permutation seed (as DDP takes rank
        0's); returns whether the step committed or there was nothing to do."""
        manager = self._link.manager
        manager.start_quorum()
        if manager.current_step() > 0:  # joined a running job: healed from a live peer in `start_quorum`
            return True
        lowest = int(manager.participating_rank() == 0)
        link = self._link
        seed = torch.tensor([link.ledger.seed * lowest], dtype=torch.int64)
        tensors = [group.anchor.clone() * lowest for group in self._groups]
        buffers = [buffer.detach().clone() * lowest for buffer in self._module.buffers()]
        works = [manager.allreduce(tensor, reduce_op=torchft_adapter.sum_op()) for tensor in [seed, *tensors, *buffers]]
        for work in works:
            work.wait()
        if not manager.should_commit():
            return False
        for group, values in zip(self._groups, tensors):
            group.anchor.copy_(values)
            for position, bucket in enumerate(group.buckets):
                taken = group.views(group.anchor, position)
                bucket.merge(lambda live, taken=taken: _torch_internals.foreach_copy_(live, taken), 0)
        with torch.no_grad():
            for buffer, value in zip(self._module.buffers(), buffers):
                buffer.copy_(value)
        with link.lock:
            link.ledger.seed = int(seed.item())
        return True

    # ----------------------------------------------------------------------------------------------- state
    def _float_buffers(self) -> list[Tensor]:
        return [buffer for buffer in self._module.buffers() if buffer.is_floating_point()]

    def _integer_buffers(self) -> list[Tensor]:
        return [buffer for buffer in self._module.buffers() if not buffer.is_floating_point()]

    def _optimizer_state_tensors(self) -> list[Tensor]:
        """The optimizer's floating-point state tensors, in parameter order (momentum buffers, Adam moments)."""
        tensors = []
        for param in self._params:
            for key, value in sorted(self._optimizer.state.get(param, {}).items()):
                if isinstance(value, Tensor) and value.is_floating_point() and key != "step":
                    tensors.append(value)
        return tensors

    def state_for_peer(self) -> dict[str, Any]:
        """What a joining replica takes (torchft calls this in our quorum step, while this thread waits in it)."""
        optimizer_state = {}
        for bucket in self._buckets:
            with bucket.held():
                for param in bucket.params:
                    state = self._optimizer.state.get(param)
                    if state:
                        optimizer_state[self._positions[id(param)]] = {
                            key: value.clone() if isinstance(value, Tensor) else value for key, value in state.items()
                        }
        with self._link.lock:
            ledger = self._link.ledger.state_dict()
        return {
            "anchors": [group.anchor.clone() for group in self._groups],
            "buffers": [buffer.detach().clone() for buffer in self._module.buffers()],
            "optimizer_state": optimizer_state,
            "param_groups": [
                {key: value for key, value in group.items() if key != "params"}
                for group in self._optimizer.param_groups
            ],
            "ledger": ledger,
            "extra": self._link.save_extra(),
        }

    def heal(self, state: dict[str, Any]) -> None:
        """Take a healthy peer's state: its anchor becomes this replica's parameters; uncommitted work is dropped."""
        for group, anchor in zip(self._groups, state["anchors"]):
            group.anchor.copy_(anchor)
            for position, bucket in enumerate(group.buckets):
                values = group.views(group.anchor, position)
                bucket.merge(lambda live, values=values: _torch_internals.foreach_copy_(live, values), 0)
        with torch.no_grad():
            for buffer, value in zip(self._module.buffers(), state["buffers"]):
                buffer.copy_(value)
        for bucket in self._buckets:
            with bucket.held():
                for param in bucket.params:
                    taken = state["optimizer_state"].get(self._positions[id(param)])
                    if taken is None:
                        self._optimizer.state.pop(param, None)
                    else:
                        self._optimizer.state[param] = {
                            key: value.clone() if isinstance(value, Tensor) else value for key, value in taken.items()
                        }
        for group, hyperparameters in zip(self._optimizer.param_groups, state["param_groups"]):
            group.update(hyperparameters)
        self._unsent = [[0] * len(group.buckets) for group in self._groups]
        link = self._link
        link.load_extra(state["extra"])
        with link.granted:
            link.ledger.load_state_dict(state["ledger"])
            link.claims.reset()
            link.claims.queue.extend(link.ledger.leased_to(link.claims.slot))
            link.granted.notify_all()
