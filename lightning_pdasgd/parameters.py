"""The live parameters, in buckets: the only place that reads or writes them while the engine runs.

A bucket is a few parameters that are always updated together (one optimizer call per bucket). Each bucket owns
one lock, one version counter (how many updates it has received, from this rank and from the others) and, on
CUDA, the device's update stream on which every access runs. Every access goes through one of three methods --
read into a forward's stash, apply an update, snapshot or merge for the replica exchange -- so the lock and
stream protocol is written once.

CUDA: the lock orders the host's queueing of each access; running all of them on one in-order update stream per
device (``streams.update_stream``) makes the GPU execute them in that same order, so a stash copy never reads a
newer or half-applied value than the version it records (an event per write was not enough: an update waited
only for the previous write, not for copies still queued to read the parameter).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
import torch
from torch import Tensor, nn

from lightning_pdasgd import _internals, streams

Fill = Callable[[list[Tensor], Sequence[Tensor], int], None]


class ParameterBucket:
    """Parameters of one param group, dtype and device that share a lock, a version and (CUDA) the update stream.

    Args:
        index: position of the bucket in the engine's list.
        names: each parameter's name in the module (the stash is keyed by these).
        params: the live parameters.
        group_index: the optimizer param group they belong to (a bucket never spans two groups).
    """

    def __init__(self, index: int, names: Sequence[str], params: Sequence[nn.Parameter], group_index: int) -> None:
        self.index = index
        self.names = list(names)
        self.params = list(params)
        # aliases share storage with the live parameters; their `.grad` is ours, never the user's `param.grad`
        self.aliases = [param.detach() for param in self.params]
        self.group_index = group_index
        self.numel = sum(param.numel() for param in self.params)
        self.is_cuda = self.params[0].is_cuda
        self._lock = threading.Lock()
        self._version = 0  # updates applied to this replica's bucket (local and, with several ranks, remote)
        self._local_updates = 0  # updates made by this rank's backward threads
        self._local_updates_sent = 0  # of those, how many the replica exchange has already shared

    def __len__(self) -> int:
        return len(self.params)

    @property
    def version(self) -> int:
        return self._version

    @property
    def device(self) -> torch.device:
        return self.params[0].device

    @property
    def dtype(self) -> torch.dtype:
        return self.params[0].dtype

    # ------------------------------------------------------------------------------------------- the three accesses
    def read_into(self, leaves: Sequence[Tensor], fill: Fill | None = None) -> int:
        """Write the weights a forward reads into its stash leaves (no torn reads); returns the version read.

        ``fill(aliases, leaves, version)`` may write something other than an exact copy (weight prediction).
        """
        with self._lock, streams.on_update_stream(self.device, wait=False):
            with torch.no_grad():
                if fill is None:
                    _internals.foreach_copy_(leaves, self.aliases)
                else:
                    fill(self.aliases, leaves, self._version)
            return self._version

    def update(self, read_version: int, step: Callable[[int, int], None]) -> int:
        """Run ``step(staleness, version)`` (which writes the live values) as one update; returns its staleness.

        Staleness is the number of updates this bucket received between the forward's read and this update;
        ``version`` counts the updates before this one.
        """
        # CUDA: after the gradients (ready on the stream autograd made current in the hook), on the update stream
        with self._lock, streams.on_update_stream(self.device):
            staleness = self._version - read_version
            step(staleness, self._version)
            self._version += 1
            self._local_updates += 1
        return staleness

    def snapshot_into(self, targets: Sequence[Tensor]) -> int:
        """Copy the live values into ``targets`` for the exchange; returns the local updates not yet shared."""
        with self._lock, streams.on_update_stream(self.device, join=True):
            _internals.foreach_copy_(targets, self.aliases)
            unsent = self._local_updates - self._local_updates_sent
            self._local_updates_sent = self._local_updates
            return unsent

    def merge(self, write: Callable[[list[Tensor]], None], remote_updates: int) -> None:
        """Write the other ranks' contribution into the live values (``write(aliases)``) and count their updates."""
        with self._lock, streams.on_update_stream(self.device, join=True):
            with torch.no_grad():
                write(self.aliases)
            self._version += remote_updates


def make_buckets(
    module: nn.Module, optimizer: torch.optim.Optimizer, bucket_numel: int, detached: frozenset[int] = frozenset()
) -> list[ParameterBucket]:
    """Group the optimizer's trainable parameters into buckets, in the order their gradients usually arrive.

    Backward produces gradients roughly in reverse registration order, so parameters are walked from the last
    one. A module's parameters (a layer's weight and bias) always share a bucket; consecutive modules join it
    until it holds at least ``bucket_numel`` elements (``0``: one bucket per module). A bucket never spans two
    param groups, dtypes or devices. Frozen parameters get none: the forward reads them live and nothing updates
    them. ``detached``: ids of parameters that left the module during fit (a replaced layer whose old parameters
    are still in the optimizer); like a plain step, which never sees a gradient for them, they are left alone.
    """
    names = {id(param): name for name, param in module.named_parameters()}
    ordered: list[tuple[int, str, nn.Parameter]] = []
    seen: set[int] = set()
    for group_index, group in enumerate(optimizer.param_groups):
        for param in group["params"]:
            if not param.requires_grad or id(param) in seen or (id(param) in detached and id(param) not in names):
                continue
            seen.add(id(param))
            if id(param) not in names:
                raise ValueError(
                    f"PD-ASGD: the optimizer holds a tensor of shape {tuple(param.shape)} that is not a parameter"
                    " of the LightningModule. Register every optimized tensor on the module (as an `nn.Parameter`"
                    " attribute or inside a submodule) so each forward can read a consistent copy of it."
                )
            ordered.append((group_index, names[id(param)], param))
    if not ordered:
        raise ValueError(
            "PD-ASGD: the optimizer from `configure_optimizers` holds no parameter that requires grad,"
            " so there is nothing to train."
        )
    registration = {name: position for position, (name, _) in enumerate(module.named_parameters())}
    ordered.sort(key=lambda item: -registration[item[1]])
    buckets: list[ParameterBucket] = []
    members: list[tuple[int, str, nn.Parameter]] = []
    for item in ordered:
        if members and _starts_new_bucket(members, item, bucket_numel):
            buckets.append(_bucket(len(buckets), members))
            members = []
        members.append(item)
    buckets.append(_bucket(len(buckets), members))
    return buckets


def _owner(name: str) -> str:
    return name.rpartition(".")[0]


def _starts_new_bucket(members: list[tuple[int, str, nn.Parameter]], item: tuple[int, str, nn.Parameter], bucket_numel: int) -> bool:
    first, last = members[0], members[-1]
    if item[0] != first[0] or item[2].dtype != first[2].dtype or item[2].device != first[2].device:
        return True
    if _owner(item[1]) == _owner(last[1]):
        return False  # a module's parameters stay together
    return sum(member[2].numel() for member in members) >= bucket_numel


def _bucket(index: int, members: list[tuple[int, str, nn.Parameter]]) -> ParameterBucket:
    return ParameterBucket(index, [m[1] for m in members], [m[2] for m in members], members[0][0])
