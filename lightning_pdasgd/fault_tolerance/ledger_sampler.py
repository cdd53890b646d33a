"""The training data of a fault-tolerant fit: each replica trains the batches the claim ledger grants it.

Like ``distributed/claiming.py``'s sampler it walks one shared permutation per epoch and has no ``len()`` (a
replica's share is known only when the epoch's data runs out); the grants come from the replicated ledger
(``claim_ledger.py``) instead of a key-value store, so they survive any replica's death.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from torch.utils.data import BatchSampler, DataLoader

from lightning_pdasgd.distributed.claiming import (
    SharedEpochBatchSampler,
    is_shuffled,
    shareable_size,
    with_batch_sampler,
)


class LedgerBatchSampler(SharedEpochBatchSampler):
    """Yields the batches the ledger grants this replica in the current epoch.

    Args:
        num_samples, batch_size, drop_last, shuffle: the user's loader's.
        link: returns the fit's ``FaultTolerantLink`` (it exists once training starts, after the data is set up).
        raise_if_failed: re-raises an engine error while a batch is awaited.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        drop_last: bool,
        shuffle: bool,
        link: Callable[[], Any],
        raise_if_failed: Callable[[], None] = lambda: None,
    ) -> None:
        super().__init__(num_samples, batch_size, drop_last, shuffle)
        self._link = link
        self.raise_if_failed = raise_if_failed
        self.forwards_begun: Callable[[], int] = lambda: self.yielded  # set by the fit: its forwards so far
        self.yielded = 0  # batches handed to Lightning, over every iterator

    def __iter__(self) -> Iterator[list[int]]:
        link = self._link()
        if link is None:
            raise RuntimeError("PD-ASGD: the fault-tolerant exchange has not started; no batch can be claimed.")
        # Lightning may drop an iterator whose prefetched batch never ran (a replica joining past epoch 0 takes a
        # batch while the data is set up, then starts the epoch's own iterator): those batches are claimed again
        link.untake(self.yielded - self.forwards_begun())
        self.yielded = self.forwards_begun()
        orders: dict[int, list[int]] = {}
        while (index := link.take_batch(self.epoch, self.raise_if_failed)) is not None:
            self.yielded += 1
            epoch, position = link.ledger.batch(index)  # a batch carried from the epoch before, or this epoch's
            if epoch not in orders:
                orders[epoch] = self.permutation(link.ledger.seed, epoch)
            yield orders[epoch][position * self.batch_size : (position + 1) * self.batch_size]


def ledger_dataloader(dataloader: DataLoader, link: Callable[[], Any]) -> DataLoader | None:
    """Rebuild ``dataloader`` around a :class:`LedgerBatchSampler`; ``None`` if it cannot be shared this way (an
    iterable dataset, a custom batch sampler)."""
    num_samples = shareable_size(dataloader)
    if num_samples is None:
        return None
    batch_sampler = dataloader.batch_sampler
    assert isinstance(batch_sampler, BatchSampler)
    sampler = LedgerBatchSampler(
        num_samples, batch_sampler.batch_size, batch_sampler.drop_last, is_shuffled(dataloader), link
    )
    return with_batch_sampler(dataloader, sampler)
