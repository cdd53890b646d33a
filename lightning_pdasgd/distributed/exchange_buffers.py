"""The exchange's flat buffers: each dtype/device's parameter buckets as one tensor, and the replicas' anchor.

One all-reduce per flat group instead of one per parameter. For bf16/fp16 parameters the anchor and the deltas
are float32 (a sum of low-precision deltas loses small updates), and each rank keeps a float32 ``base`` of what
its last merge really wrote, so the rounding of a merge is never shared as if it were an update.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from lightning_pdasgd.engine import _torch_internals
from lightning_pdasgd.engine.parameter_buckets import ParameterBucket


@dataclass
class FlatGroup:
    """The parameter buckets of one dtype/device, flattened into one tensor for one all-reduce."""

    buckets: list[ParameterBucket]
    anchor: Tensor
    offsets: list[list[tuple[int, int]]] = field(default_factory=list)  # per bucket, per parameter
    # ---- bf16/fp16 parameters only (issue #13): the anchor and deltas are float32, and `base` (float32) is what
    # this replica's live values were rebased to at the last merge, so the rounding of a merge into the
    # low-precision parameters is never shared as if it were an update (it would erase small updates)
    base: Tensor | None = None

    def views(self, flat: Tensor, index: int) -> list[Tensor]:
        """The slices of ``flat`` that hold bucket ``index``'s parameters, shaped like them."""
        bucket = self.buckets[index]
        return [flat[start:end].view_as(param) for (start, end), param in zip(self.offsets[index], bucket.params)]

    def snapshot(self) -> tuple[Tensor, list[int]]:
        """Copy the live parameters and each bucket's local updates not yet shared."""
        flat = torch.empty_like(self.anchor)  # float32 for low-precision groups: copy_ converts exactly
        counts = [bucket.snapshot_into(self.views(flat, index)) for index, bucket in enumerate(self.buckets)]
        return flat, counts


def make_flat_groups(buckets: list[ParameterBucket]) -> list[FlatGroup]:
    grouped: dict[tuple[torch.dtype, torch.device], list[ParameterBucket]] = {}
    for bucket in buckets:
        grouped.setdefault((bucket.dtype, bucket.device), []).append(bucket)
    groups = []
    for members in grouped.values():
        offsets, start = [], 0
        for bucket in members:
            spans = []
            for param in bucket.params:
                spans.append((start, start + param.numel()))
                start += param.numel()
            offsets.append(spans)
        anchor = torch.cat([param.detach().reshape(-1) for bucket in members for param in bucket.params]).clone()
        base = None
        if anchor.dtype in _LOW_PRECISION:  # sums of low-precision deltas lose small updates: float32 instead
            anchor = anchor.float()
            base = anchor.clone()
        groups.append(FlatGroup(buckets=members, anchor=anchor, offsets=offsets, base=base))
    return groups


_LOW_PRECISION = (torch.bfloat16, torch.float16)


def merge_rebased(
    live: list[Tensor], anchor: list[Tensor], taken: list[Tensor], base: list[Tensor], consistent: bool
) -> None:
    """Low precision: ``live += anchor - taken`` rounded once, and ``base := taken + (what live really moved)``.

    At a consistent point ``live := anchor`` (rounded the same way on every rank) and ``base := live``.
    """
    if consistent:
        _torch_internals.foreach_copy_(live, anchor)
        _torch_internals.foreach_copy_(base, live)
        return
    before = [value.float() for value in live]
    _torch_internals.foreach_copy_(live, torch._foreach_add(torch._foreach_sub(list(anchor), list(taken)), before))
    moved = torch._foreach_sub([value.float() for value in live], before)
    _torch_internals.foreach_copy_(base, torch._foreach_add(list(taken), moved))


def apply_round(
    groups: list[FlatGroup],
    snapshots: list[Tensor],
    merged: list[Tensor],
    local_counts: list[int],
    total_counts: list[int],
    consistent: bool,
) -> None:
    """Apply a round's merged deltas (their sum, or their mean): ``anchor += merged``; then under each bucket's lock
    ``live += anchor - snapshot`` (the other replicas' deltas, keeping this replica's updates made during the round),
    or at a consistent point ``live := anchor``. The update counts (per bucket, flat) advance the buckets' versions
    by the others' updates."""
    index = 0
    for group, snapshot, delta in zip(groups, snapshots, merged):
        group.anchor += delta
        for position, bucket in enumerate(group.buckets):
            anchor = group.views(group.anchor, position)
            remote = 0 if consistent else total_counts[index] - local_counts[index]
            if group.base is not None:  # bf16/fp16: rebased in float32, consistent points included
                taken, base = group.views(snapshot, position), group.views(group.base, position)
                bucket.merge(
                    lambda live, anchor=anchor, taken=taken, base=base: merge_rebased(
                        live, anchor, taken, base, consistent
                    ),
                    remote,
                )
            elif consistent:
                bucket.merge(lambda live, anchor=anchor: _torch_internals.foreach_copy_(live, anchor), remote)
            else:
                taken = group.views(snapshot, position)
                bucket.merge(
                    lambda live, anchor=anchor, taken=taken: _torch_internals.foreach_add_difference_(
                        live, anchor, taken
                    ),
                    remote,
                )
            index += 1
