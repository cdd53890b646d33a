"""Making every replica's buffers and optimizer state identical at a consistent point, in a handful of collectives.

A consistent point averages every float buffer (BatchNorm's running statistics) and every floating optimizer state,
and takes the maximum of the others (``num_batches_tracked``, Adam's ``step``). One all-reduce per tensor cost a
consistent point about 17 ms on two CPU ranks (two dozen collectives, each a wait for the other rank's exchange
thread) against a 2 ms training step. So the tensors are packed, one all-reduce per dtype and reduction, and the
check that every rank holds the same kinds of state is one all-reduce of a checksum instead of a pickled
all-gather. Each element is reduced exactly as by its own all-reduce.
"""

from __future__ import annotations

import zlib
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

# the most elements one packed all-reduce carries (a transient copy of the states, bounded for large models)
_PACK_NUMEL = 1 << 24


def all_reduce_packed(tensors: list[Tensor], op: Any, group: Any, device: torch.device, divide_by: int = 1) -> None:
    """All-reduce ``tensors`` in place with ``op``, packed per dtype into buffers on ``device`` (the group's), and
    divide the results by ``divide_by`` in their own dtype (as ``tensor /= n`` after its own all-reduce)."""
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for tensor in tensors:
        by_dtype.setdefault(tensor.dtype, []).append(tensor)
    for same_dtype in by_dtype.values():
        for pack in _packs(same_dtype):
            with torch.no_grad():
                flat = torch.cat([tensor.detach().reshape(-1).to(device) for tensor in pack])
                dist.all_reduce(flat, op=op, group=group)
                if divide_by != 1:
                    flat /= divide_by
                offset = 0
                for tensor in pack:
                    tensor.copy_(flat[offset : offset + tensor.numel()].view(tensor.shape))
                    offset += tensor.numel()


def _packs(tensors: list[Tensor]) -> list[list[Tensor]]:
    packs: list[list[Tensor]] = [[]]
    size = 0
    for tensor in tensors:
        if packs[-1] and size + tensor.numel() > _PACK_NUMEL:
            packs.append([])
            size = 0
        packs[-1].append(tensor)
        size += tensor.numel()
    return packs if packs[0] else []


def same_on_every_rank(description: Any, group: Any, device: torch.device) -> bool:
    """Whether every rank passed the same ``description`` (its ``repr``): one all-reduce of a checksum."""
    checksum = float(zlib.crc32(repr(description).encode()))
    probe = torch.tensor([checksum, -checksum], dtype=torch.float64, device=device)
    dist.all_reduce(probe, op=dist.ReduceOp.MAX, group=group)
    highest, lowest = probe.tolist()
    return highest == checksum == -lowest


def make_state_identical(
    module: torch.nn.Module, optimizer: torch.optim.Optimizer, params: list[Tensor], rank: int, group: Any,
    device: torch.device, world_size: int,
) -> None:
    """Float buffers and floating optimizer states averaged, the others (counters, ``step``) at their maximum over
    the ranks. Where some rank holds other kinds of optimizer state (one never updated some parameter), every rank
    first takes rank 0's whole optimizer state."""
    buffers = [buffer.data for buffer in module.buffers()]
    averaged = [buffer for buffer in buffers if buffer.is_floating_point()]
    highest = [buffer for buffer in buffers if not buffer.is_floating_point()]
    state = optimizer.state
    layout = [sorted((key, _kind(value)) for key, value in state.get(param, {}).items()) for param in params]
    if same_on_every_rank(layout, group, device):
        for param in params:
            for key, value in sorted(state.get(param, {}).items()):
                if isinstance(value, Tensor):
                    (highest if key == "step" or not value.is_floating_point() else averaged).append(value)
    else:
        holder = [optimizer.state_dict() if rank == 0 else None]
        dist.broadcast_object_list(holder, src=dist.get_global_rank(group, 0), group=group)
        if rank != 0:
            optimizer.load_state_dict(holder[0])
    all_reduce_packed(averaged, dist.ReduceOp.SUM, group, device, divide_by=world_size)
    all_reduce_packed(highest, dist.ReduceOp.MAX, group, device)


def _kind(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"tensor{tuple(value.shape)}{value.dtype}"
    return type(value).__name__
