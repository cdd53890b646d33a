"""The live parameters, in buckets: the only place that reads or writes them while the engine runs.

A bucket is a few parameters that are always updated together (one optimizer call per bucket). Each bucket owns
one lock, one version counter (how many updates it has received, from this rank and from the others) and, on
CUDA, the device's update stream on which every access runs. Every access goes through one of its methods --
a forward's read, an update, a snapshot or merge for the replica exchange -- so the lock and stream protocol is
written once.

Copy-on-write: a forward reads a bucket by aliasing its live storage (no copy), so the graph it builds holds that
storage until its backward has run. A write (an update, an exchange merge) never goes in place into storage that a
live graph still reads: it goes into a second buffer (pooled; filled with the live values first) that then becomes
the live storage (``param.data`` is re-pointed, the parameter object stays the same). Where no graph reads the
live storage, the write is in place. So a backward always computes the exact gradient at the weights its forward
read, and the weights cost one buffer per version still read, not one copy per forward.

Storage given from outside: code outside the engine may point a parameter at a storage it keeps an alias of
(``param.data = x``: the lottery-ticket reset of Lightning's ``ModelPruning`` points ``weight_orig`` at its copy
of the initial weights and relies on plain steps writing into it, so its later resets are no-ops). Such a storage
stays the live one and every write goes in place, as with plain ``optimizer.step()``; forwards read a private copy
of it instead of aliasing it.

CUDA: the lock orders the host's queueing of each access; running all of them on one in-order update stream per
device (``cuda_streams.update_stream``) makes the GPU execute them in that same order. A forward's stream waits for
the update stream when it reads a bucket; a buffer returns to the pool only after the backwards that read it
were queued and the update stream was made to wait for their streams (``cuda_streams.finish``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_pdasgd.engine import _torch_internals, cuda_streams

Fill = Callable[[list[Tensor], Sequence[Tensor], int], None]


@dataclass(eq=False)
class WeightVersion:
    """One storage of a bucket's values: the live one, or an older one that forwards' graphs still read."""

    tensors: list[Tensor]
    readers: int = 0  # forwards that aliased this storage and whose backward has not finished
    pinned: bool = False  # read by a forward that was never handed off: its graph may live on, never reuse it
    shared: bool = False  # given from outside (code may hold an alias): written in place, read through copies


class ParameterBucket:
    """Parameters of one param group, dtype and device that share a lock, a version and (CUDA) the update stream.

    Args:
        index: position of the bucket in the engine's list.
        names: each parameter's name in the module (the stash is keyed by these).
        params: the live parameters.
        group_index: the optimizer param group they belong to (a bucket never spans two groups).
        shared: the parameters' storage was given from outside the engine (see the module docstring).
    """

    def __init__(
        self,
        index: int,
        names: Sequence[str],
        params: Sequence[nn.Parameter],
        group_index: int,
        shared: bool = False,
    ) -> None:
        self.index = index
        self.names = list(names)
        self.params = list(params)
        self.group_index = group_index
        self.numel = sum(param.numel() for param in self.params)
        self.is_cuda = self.params[0].is_cuda
        self._device = self.params[0].device  # read on every access: one `torch.device` object, not one per call
        self._lock = threading.Lock()
        # the live storage: aliases of the parameters (their `.grad` is ours, never the user's `param.grad`)
        self._live = WeightVersion([param.detach() for param in self.params], shared=shared)
        self._spares: list[WeightVersion] = []
        self._version = 0  # updates applied to this replica's bucket (local and, with several ranks, remote)
        self._local_updates = 0  # updates made by this rank's backward threads
        self._local_updates_sent = 0  # of those, how many the replica exchange has already shared

    def __len__(self) -> int:
        return len(self.params)

    @property
    def version(self) -> int:
        return self._version

    @property
    def aliases(self) -> list[Tensor]:
        """The live values (read-only use: writes go through ``update`` or ``merge``)."""
        return self._live.tensors

    def given_from_outside(self) -> list[nn.Parameter]:
        """The parameters whose storage was given from outside: followed already, or since the last forward."""
        return [
            param
            for param, tensor in zip(self.params, self._live.tensors)
            if self._live.shared or param.data_ptr() != tensor.data_ptr()
        ]

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return self.params[0].dtype

    # ------------------------------------------------------------------------------------------- reads
    def read(self) -> tuple[WeightVersion, int]:
        """A forward reads the live storage (no copy; a private copy of a storage given from outside); returns it
        and its version. ``release`` it after the backward. CUDA: the caller's stream is ordered after every queued
        update of the bucket."""
        with self._lock:
            read = self._live
            if read.shared:
                read = self._spare_copy()
            read.readers += 1
            cuda_streams.read_after_updates(self.device, read.tensors)
            return read, self._version

    def release(self, read: WeightVersion, reusable: bool = True) -> None:
        """A forward's graph no longer holds ``read`` (its backward ran). ``reusable=False``: the forward was never
        handed off, so a graph may still hold the storage: it is never written again."""
        with self._lock:
            self._release(read, reusable)

    def _release(self, read: WeightVersion, reusable: bool) -> None:
        """``release`` under the lock, which the caller holds."""
        read.readers -= 1
        if not reusable:
            read.pinned = True
        if read.readers == 0 and read is not self._live and not read.pinned:
            self._spares.append(read)

    def read_into(self, leaves: Sequence[Tensor], fill: Fill | None = None) -> int:
        """Write the weights a forward reads into private ``leaves`` (a copy: used where the compensation predicts
        weights); returns the version read. ``fill(live, leaves, version)`` writes something other than a copy."""
        with self._lock, cuda_streams.on_update_stream(self.device, wait=False):
            with torch.no_grad():
                if fill is None:
                    _torch_internals.foreach_copy_(leaves, self._live.tensors)
                else:
                    fill(self._live.tensors, leaves, self._version)
            return self._version

    def follow_external_storage(self) -> bool:
        """Adopt a storage that code outside the engine gave a parameter (``param.data = x``: e.g. the lottery-ticket
        reset of Lightning's ``ModelPruning``, or ``torch.nn.utils.prune.remove``); returns whether it did.

        The new values are the live ones from now on, as they would be for a plain ``optimizer.step()``; the old
        storage stays with the forwards that read it and is never reused (its shape may differ).
        """
        if self._follows_params():  # the common case, without the lock
            return False
        with self._lock:  # again under the lock: an update may have been re-pointing the parameters just now
            if self._follows_params():
                return False
            previous, self._live = self._live, WeightVersion(self._adopted_tensors(), shared=True)
            previous.pinned = True
            self._spares.clear()
        return True

    def _adopted_tensors(self) -> list[Tensor]:
        """The live tensors after a storage was given from outside: those given are adopted as they are; the
        others get a copy of their values, because an earlier forward may still read their storage and a shared
        bucket writes in place (the caller holds the lock)."""
        tensors = []
        with cuda_streams.on_update_stream(self.device, wait=False), torch.no_grad():
            for param, tensor in zip(self.params, self._live.tensors):
                if param.data_ptr() == tensor.data_ptr() and param.shape == tensor.shape:
                    param.data = tensor.clone()
                tensors.append(param.detach())
        return tensors

    def _follows_params(self) -> bool:
        return all(p.data_ptr() == t.data_ptr() and p.shape == t.shape for p, t in zip(self.params, self._live.tensors))

    @contextmanager
    def held(self) -> Iterator[None]:
        """No read, update or merge of this bucket runs inside: code outside the engine (Lightning's own step, with
        several devices) reads and writes the live parameters in place meanwhile."""
        with self._lock:
            yield

    # ------------------------------------------------------------------------------------------- writes
    def update(
        self,
        read_version: int,
        step: Callable[[int, int, list[Tensor]], None],
        finished_read: WeightVersion | None = None,
    ) -> int:
        """Run ``step(staleness, version, targets)`` as one update; returns its staleness.

        ``targets`` hold the live values and are what ``step`` writes: the live storage itself when no forward
        reads it, else a second buffer that becomes live afterwards (copy-on-write). Staleness is the number of
        updates this bucket received between the forward's read and this update; ``version`` counts the updates
        before this one.

        ``finished_read``: the read of the backward whose gradients this update applies, released first (CPU).
        Once every gradient of a bucket has been accumulated, no node of that backward uses the bucket's weights
        again (autograd runs a leaf's accumulation after every node that took the leaf as input), so that read
        no longer needs protecting, and with no other forward reading the storage the update writes in place
        instead of copying the bucket. On CUDA the read stays until the backward ends (the caller releases it).
        """
        # CUDA: after the gradients (ready on the stream autograd made current in the hook), on the update stream
        with self._lock, cuda_streams.on_update_stream(self._device) if self.is_cuda else cuda_streams.NO_STREAM:
            if finished_read is not None:
                self._release(finished_read, reusable=True)
            staleness = self._version - read_version
            target = self._writable()
            step(staleness, self._version, target.tensors)
            self._make_live(target)
            self._version += 1
            self._local_updates += 1
        return staleness

    def snapshot_into(self, targets: Sequence[Tensor]) -> int:
        """Copy the live values into ``targets`` for the exchange; returns the local updates not yet shared."""
        with self._lock, cuda_streams.on_update_stream(self.device, join=True):
            _torch_internals.foreach_copy_(targets, self._live.tensors)
            unsent = self._local_updates - self._local_updates_sent
            self._local_updates_sent = self._local_updates
            return unsent

    def merge(self, write: Callable[[list[Tensor]], None], remote_updates: int) -> None:
        """Write the other ranks' contribution into the live values (``write(targets)``, copy-on-write like an
        update) and count their updates."""
        with self._lock, cuda_streams.on_update_stream(self.device, join=True):
            target = self._writable()
            with torch.no_grad():
                write(target.tensors)
            self._make_live(target)
            self._version += remote_updates

    def _writable(self) -> WeightVersion:
        """The live storage when nothing reads it (or it was given from outside), else a spare buffer holding a
        copy of the live values."""
        live = self._live
        if live.shared or (live.readers == 0 and not live.pinned):
            return live
        return self._spare_copy()

    def _spare_copy(self) -> WeightVersion:
        """A pooled buffer holding a copy of the live values (the caller holds the lock; CUDA: on the update
        stream, so the copy runs after every queued update)."""
        live = self._live
        spare = self._spares.pop() if self._spares else WeightVersion([torch.empty_like(t) for t in live.tensors])
        with cuda_streams.on_update_stream(self.device, wait=False), torch.no_grad():
            _torch_internals.foreach_copy_(spare.tensors, live.tensors)
        return spare

    def _make_live(self, target: WeightVersion) -> None:
        """Point the parameters at ``target`` (the module, Lightning and checkpoints see the newest values)."""
        if target is self._live:
            return
        self._live = target
        for param, tensor in zip(self.params, target.tensors):
            param.data = tensor


def make_buckets(
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    bucket_numel: int | str,
    detached: frozenset[int] = frozenset(),
    shared: frozenset[int] = frozenset(),
) -> list[ParameterBucket]:
    """Group the optimizer's trainable parameters into buckets, in the order their gradients usually arrive.

    Backward produces gradients roughly in reverse registration order, so parameters are walked from the last one. A
    module's parameters (a layer's weight and bias) always share a bucket; consecutive modules join it until it
    holds at least ``bucket_numel`` elements (``0``: one bucket per module; ``"auto"``: see ``auto_bucket_numel``).
    A bucket never spans two param groups, dtypes or devices. Frozen parameters get none: the forward reads them
    live and nothing updates them. ``detached``: ids of parameters that left the module during fit (a replaced layer
    whose old parameters are still in the optimizer); like a plain step, which never sees a gradient for them, they
    are left alone.
    ``shared``: ids of parameters whose storage was given from outside the engine (their bucket writes in place).
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
    if bucket_numel == "auto":
        bucket_numel = auto_bucket_numel(sum(param.numel() for _, _, param in ordered))
    assert isinstance(bucket_numel, int)
    registration = {name: position for position, (name, _) in enumerate(module.named_parameters())}
    ordered.sort(key=lambda item: -registration[item[1]])
    buckets: list[ParameterBucket] = []
    members: list[tuple[int, str, nn.Parameter]] = []
    for item in ordered:
        if members and _starts_new_bucket(members, item, bucket_numel):
            buckets.append(_bucket(len(buckets), members, shared))
            members = []
        members.append(item)
    buckets.append(_bucket(len(buckets), members, shared))
    return buckets


AUTO_BUCKET_NUMEL = 1 << 16


def auto_bucket_numel(trained_elements: int) -> int:
    """``bucket_numel="auto"``: 65,536 elements, few buckets and little Python per step; but a model smaller than
    that would be one bucket, which every forward reads a full update stale (lazy reads can refresh only what the
    previous backward has already updated), so it gets a bucket per module. Measured on a 64-64-64-64-10 MLP without
    normalization (13,130 parameters, SGD momentum 0.9): 0.757 in one bucket, 0.879 in a bucket per module, plain
    Lightning 0.886 (docs/convergence.md)."""
    return AUTO_BUCKET_NUMEL if trained_elements >= AUTO_BUCKET_NUMEL else 0


def _owner(name: str) -> str:
    return name.rpartition(".")[0]


def _starts_new_bucket(
    members: list[tuple[int, str, nn.Parameter]], item: tuple[int, str, nn.Parameter], bucket_numel: int
) -> bool:
    first, last = members[0], members[-1]
    if item[0] != first[0] or item[2].dtype != first[2].dtype or item[2].device != first[2].device:
        return True
    if _owner(item[1]) == _owner(last[1]):
        return False  # a module's parameters stay together
    return sum(member[2].numel() for member in members) >= bucket_numel


def _bucket(index: int, members: list[tuple[int, str, nn.Parameter]], shared: frozenset[int]) -> ParameterBucket:
    params = [m[2] for m in members]
    given = any(id(param) in shared for param in params)
    return ParameterBucket(index, [m[1] for m in members], params, members[0][0], shared=given)
