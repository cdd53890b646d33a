"""Dynamic work sharing: ranks claim the next batches of one common permutation as they become ready.

A fixed per-rank shard (Lightning's ``DistributedSampler``) makes every fast rank idle at the end of each epoch
until the slowest one finishes its shard. Here every rank walks the same permutation of the epoch and claims
batch ``k`` with an atomic ``store.add`` on torch.distributed's key-value store, so a fast rank simply processes
more batches, every sample is used exactly once per epoch, and the epoch ends when the data is consumed.

Given its rank, a sampler keeps batch ``rank`` of every epoch for itself (the counter hands out the rest), so every
rank trains at least one batch per epoch and reaches that epoch's validation and epoch-end consistent points, however
fast the others are. The epoch may be cut short: ``max_batches`` (``limit_train_batches`` over all ranks) and
``budget`` (given the epoch's batches, how many this epoch's claims may still take: what ``max_steps`` leaves, less
what a mid-epoch checkpoint already trained; see ``step_accounting.py``).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, Sampler
from torch.utils.data.distributed import DistributedSampler

from lightning_pdasgd.engine import _torch_internals


class SharedEpochBatchSampler(Sampler[list[int]]):
    """What every sampler that shares an epoch's batches between replicas has: the dataset's size and batching, the
    epoch (Lightning sets it), the epoch's batch count (``limit_train_batches`` over all replicas) and its permutation.
    """

    def __init__(self, num_samples: int, batch_size: int, drop_last: bool, shuffle: bool) -> None:
        if num_samples <= 0 or batch_size <= 0:
            raise ValueError(f"{type(self).__name__}: nothing to share ({num_samples} samples, batch {batch_size}).")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.shuffle = shuffle
        self.max_batches: int | None = None  # batches per epoch, all ranks together (limit_train_batches)
        self.epoch = 0
        # Lightning calls `set_epoch` on `dataloader.sampler` and `dataloader.batch_sampler.sampler` only
        self.sampler = EpochForwarder(self)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def num_batches(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    @property
    def epoch_batches(self) -> int:
        """Batches in one epoch, all ranks together: the dataset's, or fewer under ``limit_train_batches``."""
        return self.num_batches if self.max_batches is None else min(self.num_batches, self.max_batches)

    def permutation(self, seed: int, epoch: int) -> list[int]:
        """The sample order of ``epoch``: the same on every replica given the same ``seed``."""
        if not self.shuffle:
            return list(range(self.num_samples))
        generator = torch.Generator().manual_seed(seed + epoch)
        return torch.randperm(self.num_samples, generator=generator).tolist()


class ClaimingBatchSampler(SharedEpochBatchSampler):
    """Yields the batches this rank claims from the epoch's shared permutation.

    It has no ``len()`` on purpose: a rank's share is only known when the epoch's data runs out, and Lightning then
    prefetches one batch to see the end coming, so validation and epoch-end hooks run after the true last batch
    (a known length would make Lightning stop one ``StopIteration`` too late for them). ``num_batches`` is the
    whole epoch's count and ``estimated_batches`` this rank's expected share.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        drop_last: bool,
        shuffle: bool,
        seed: int,
        store: Any,
        key_prefix: str,
        world_size: int = 1,
        rank: int | None = None,
    ) -> None:
        super().__init__(num_samples, batch_size, drop_last, shuffle)
        self.seed = seed
        self.store = store
        self.key_prefix = key_prefix
        self.world_size = world_size
        self.rank = rank  # None: no reserved batch (every batch through the counter)
        self.budget: Callable[[int], int] | None = None  # epoch's batches -> claims it may still take
        self.claimed: list[int] = []  # batch indices this rank claimed in the current epoch

    @property
    def estimated_batches(self) -> int:
        return math.ceil(self.epoch_batches / max(self.world_size, 1))

    def _limit(self) -> int:
        return self.epoch_batches if self.budget is None else self.budget(self.epoch_batches)

    def __iter__(self) -> Iterator[list[int]]:
        order = self.permutation(self.seed, self.epoch)
        key = f"{self.key_prefix}/epoch{self.epoch}"
        reserved = self.rank is not None and 0 <= self.rank < self.world_size
        self.claimed = []
        index = self.rank if reserved else None
        while True:
            if index is None:  # read the limit at every claim: max_steps' budget is known only once the epoch starts
                index = int(self.store.add(key, 1)) - 1 + (self.world_size if reserved else 0)
            if index >= self._limit():
                return
            self.claimed.append(index)
            yield order[index * self.batch_size : (index + 1) * self.batch_size]
            index = None


class EpochForwarder:
    """Stands where Lightning looks for ``set_epoch`` (``batch_sampler.sampler``) and forwards it."""

    def __init__(self, owner: Any) -> None:
        self._owner = owner

    def set_epoch(self, epoch: int) -> None:
        self._owner.set_epoch(epoch)


def is_shuffled(dataloader: DataLoader) -> bool:
    sampler = dataloader.sampler
    if isinstance(sampler, DistributedSampler):
        return bool(sampler.shuffle)
    return isinstance(sampler, RandomSampler)


def claiming_dataloader(
    dataloader: DataLoader, seed: int, store: Any, key_prefix: str, world_size: int, rank: int | None = None
) -> DataLoader | None:
    """Rebuild ``dataloader`` around a :class:`ClaimingBatchSampler`; ``None`` if it cannot be shared this way.

    Map-style datasets with a plain batch sampler are shared; iterable datasets and custom batch samplers keep
    their own sharding (the caller warns).
    """
    num_samples = shareable_size(dataloader)
    if num_samples is None:
        return None
    batch_sampler = dataloader.batch_sampler
    assert isinstance(batch_sampler, BatchSampler)
    claiming = ClaimingBatchSampler(
        num_samples=num_samples,
        batch_size=batch_sampler.batch_size,
        drop_last=batch_sampler.drop_last,
        shuffle=is_shuffled(dataloader),
        seed=seed,
        store=store,
        key_prefix=key_prefix,
        world_size=world_size,
        rank=rank,
    )
    return with_batch_sampler(dataloader, claiming)


def shareable_size(dataloader: DataLoader) -> int | None:
    """The dataset's length if its batches can be handed out by index (a map-style dataset with Lightning's plain
    batch sampler), else ``None``."""
    batch_sampler = dataloader.batch_sampler
    if not isinstance(batch_sampler, BatchSampler) or type(batch_sampler) is not BatchSampler:
        return None
    try:
        return len(dataloader.dataset)  # type: ignore[arg-type]
    except TypeError:
        return None


def with_batch_sampler(dataloader: DataLoader, batch_sampler: Sampler[list[int]]) -> DataLoader:
    """``dataloader`` with every setting kept but its batches drawn from ``batch_sampler``."""
    workers = dataloader.num_workers
    return DataLoader(
        dataloader.dataset,
        batch_sampler=batch_sampler,
        num_workers=workers,
        collate_fn=dataloader.collate_fn,
        pin_memory=dataloader.pin_memory,
        timeout=dataloader.timeout,
        worker_init_fn=dataloader.worker_init_fn,
        multiprocessing_context=dataloader.multiprocessing_context,
        generator=dataloader.generator,
        prefetch_factor=dataloader.prefetch_factor if workers > 0 else None,
        persistent_workers=dataloader.persistent_workers if workers > 0 else False,
        pin_memory_device=dataloader.pin_memory_device,
    )


def new_claim_key() -> tuple[int, str]:
    """What every rank must agree on (rank 0's, broadcast): the permutations' seed and the store keys' prefix.

    Rank 0's torch seed orders the shared permutations (reproducible under ``seed_everything``, and no random
    number is drawn from the user's generator); the nonce keeps different runs' keys apart in one store.
    """
    return torch.initial_seed() % (2**31 - 1), f"pdasgd/claims/{time.time_ns()}-{os.getpid()}"


def claim_batches(
    dataloader: object, claim_key: tuple[int, str] | None, world_size: int, rank: int | None = None
) -> object:
    """The training dataloader shared dynamically between ``world_size`` ranks, or as it is when it cannot be."""
    if not isinstance(dataloader, DataLoader) or claim_key is None:
        return dataloader
    seed, prefix = claim_key
    claiming = claiming_dataloader(dataloader, seed, _torch_internals.default_store(), prefix, world_size, rank)
    if claiming is None:
        from lightning_utilities.core.rank_zero import rank_zero_warn  # the one both Lightning packages re-export

        rank_zero_warn(
            "PD-ASGD: the training dataloader (an iterable dataset or a custom batch sampler) cannot be shared"
            " dynamically between ranks, so each rank iterates its own shard and a slow rank delays the end of"
            " every epoch. Use a map-style dataset with a standard batch sampler for straggler-proof epochs."
        )
        return dataloader
    return claiming
