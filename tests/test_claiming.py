"""Dynamic batch claiming on a real torch.distributed TCPStore: ranks share an epoch, each batch exactly once."""

from __future__ import annotations

import threading

import pytest
import torch
from torch.distributed import TCPStore
from torch.utils.data import DataLoader, TensorDataset

from lightning_pdasgd.distributed.claiming import ClaimingBatchSampler, claiming_dataloader


@pytest.fixture
def store() -> TCPStore:
    return TCPStore("127.0.0.1", 0, world_size=1, is_master=True, wait_for_workers=False)


def _sampler(
    store: TCPStore, shuffle: bool = True, drop_last: bool = False, prefix: str = "test"
) -> ClaimingBatchSampler:
    return ClaimingBatchSampler(103, 10, drop_last, shuffle, seed=5, store=store, key_prefix=prefix, world_size=2)


def test_two_ranks_share_every_batch_once_and_the_fast_one_takes_more(store: TCPStore) -> None:
    fast, slow = _sampler(store), _sampler(store)
    taken: dict[str, list[list[int]]] = {"fast": [], "slow": []}

    fast_done = threading.Event()

    def consume(name: str, sampler: ClaimingBatchSampler) -> None:
        for batch in sampler:
            taken[name].append(batch)
            if name == "slow":  # stalls after each batch until the fast rank has run out of batches
                assert fast_done.wait(30)
        if name == "fast":
            fast_done.set()

    threads = [threading.Thread(target=consume, args=("fast", fast)),
               threading.Thread(target=consume, args=("slow", slow))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    samples = [i for batch in taken["fast"] + taken["slow"] for i in batch]
    assert sorted(samples) == list(range(103))  # every sample exactly once (last batch partial)
    assert len(taken["fast"]) > len(taken["slow"])
    assert sorted(fast.claimed + slow.claimed) == list(range(11))


def test_epochs_use_new_permutations_and_counters(store: TCPStore) -> None:
    sampler = _sampler(store)
    sampler.sampler.set_epoch(0)  # where Lightning calls it
    first = [i for batch in sampler for i in batch]
    sampler.sampler.set_epoch(1)
    second = [i for batch in sampler for i in batch]
    assert sorted(first) == sorted(second) == list(range(103))
    assert first != second
    assert [i for batch in _sampler(store, shuffle=False, prefix="ordered") for i in batch] == list(range(103))


def test_drop_last_and_no_length(store: TCPStore) -> None:
    sampler = _sampler(store, drop_last=True)
    assert sampler.num_batches == 10 and sampler.estimated_batches == 5
    assert sum(len(batch) for batch in sampler) == 100
    with pytest.raises(TypeError):
        len(sampler)  # type: ignore[arg-type]


class _Stream(torch.utils.data.IterableDataset):
    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(range(10))


def test_dataloader_is_rebuilt_with_the_same_settings(store: TCPStore) -> None:
    data = TensorDataset(torch.arange(50.0))
    loader = DataLoader(data, batch_size=8, shuffle=False, drop_last=True)
    rebuilt = claiming_dataloader(loader, seed=0, store=store, key_prefix="dl", world_size=1)
    assert rebuilt is not None and isinstance(rebuilt.batch_sampler, ClaimingBatchSampler)
    assert [batch[0].tolist() for batch in rebuilt] == [batch[0].tolist() for batch in loader]
    iterable = DataLoader(_Stream(), batch_size=4)
    assert claiming_dataloader(iterable, seed=0, store=store, key_prefix="it", world_size=1) is None


def test_every_rank_keeps_one_batch_and_the_budget_cuts_the_epoch(store: TCPStore) -> None:
    """Batch `rank` is kept for its rank even when another rank claims everything first; a budget ends the claims."""
    fast, slow = (ClaimingBatchSampler(103, 10, False, True, seed=5, store=store, key_prefix="reserve", world_size=2,
                                       rank=rank) for rank in (0, 1))
    fast_batches = list(fast)  # the fast rank runs through the whole epoch before the slow one starts
    slow_batches = list(slow)
    assert slow.claimed == [1] and len(slow_batches) == 1
    assert sorted(fast.claimed + slow.claimed) == list(range(11)) and len(fast_batches) == 10

    budgeted = [ClaimingBatchSampler(103, 10, False, True, seed=5, store=store, key_prefix="budget", world_size=2,
                                     rank=rank) for rank in (0, 1)]
    for sampler in budgeted:
        sampler.max_batches = 8  # limit_train_batches, all ranks together
        sampler.budget = lambda epoch_batches: min(epoch_batches, 5)  # what max_steps leaves
        assert sampler.epoch_batches == 8 and sampler.estimated_batches == 4
    assert sum(len(list(sampler)) for sampler in budgeted) == 5
    assert sorted(budgeted[0].claimed + budgeted[1].claimed) == list(range(5))
