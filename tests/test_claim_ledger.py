"""The replicated claim ledger: every batch of an epoch trained exactly once while replicas die and join.

Why: with fault tolerance, the claim counter cannot live in one rank's store (it dies with that rank). The ledger is
changed only by committed rounds, identically on every live replica; these tests drive it through rounds the way
the fault-tolerant exchange does (sum of contributions, commit or not) and count every batch's training.
"""

from __future__ import annotations

import random

import pytest
import torch

from lightning_pdasgd.fault_tolerance.claim_ledger import DONE, FREE, ClaimLedger, LocalClaims


class _Replica:
    """One replica's ledger copy and claims, and the batches it trained (an update lands when a batch finishes)."""

    def __init__(self, slot: int, ledger: ClaimLedger, lease: int = 3) -> None:
        self.slot = slot
        self.ledger = ledger
        self.claims = LocalClaims(slot, lease=lease)
        self.trained: list[int] = []

    def train(self, count: int) -> None:
        for _ in range(count):
            index = self.claims.take()
            if index is None:
                return
            self.trained.append(index)
            self.claims.finish(1)


def _round(replicas: list[_Replica], commit: bool = True) -> None:
    """One exchange round among ``replicas``: contributions summed; applied by each only if the round commits."""
    summed = sum(replica.claims.contribute(replica.ledger) for replica in replicas)
    if not commit:
        return
    for replica in replicas:
        grants = replica.ledger.apply(summed)
        replica.claims.committed(grants)


def _copy(ledger: ClaimLedger) -> ClaimLedger:
    twin = ClaimLedger(1, 1)
    twin.load_state_dict(ledger.state_dict())
    return twin


def test_grants_follow_requests_and_finished_batches_become_done() -> None:
    ledger_a, ledger_b = ClaimLedger(10, 4), ClaimLedger(10, 4)
    a, b = _Replica(0, ledger_a, lease=3), _Replica(2, ledger_b, lease=2)
    _round([a, b])
    assert list(a.claims.queue) == [0, 2, 4] and list(b.claims.queue) == [1, 3]  # one each in turn, in index order
    assert ledger_a.is_member(0) and ledger_a.is_member(2) and not ledger_a.is_member(1)
    a.train(2)
    _round([a, b])
    assert ledger_a.owner[[0, 2]].tolist() == [DONE, DONE]
    assert list(a.claims.queue) == [4, 5, 6]  # topped up to the lease
    assert torch.equal(ledger_a.owner, ledger_b.owner)
    assert ledger_a.committed_batches == 2


def test_a_round_that_does_not_commit_changes_nothing_and_is_contributed_again() -> None:
    ledger = ClaimLedger(6, 2)
    a = _Replica(0, ledger, lease=2)
    _round([a])
    a.train(2)
    before = ledger.owner.clone()
    _round([a], commit=False)
    assert torch.equal(ledger.owner, before) and a.claims.finished == [0, 1]
    _round([a])
    assert ledger.owner[:2].tolist() == [DONE, DONE] and a.claims.finished == []


def test_a_dead_replicas_leases_go_back_to_the_pool_and_the_survivor_trains_them() -> None:
    ledger_a, ledger_b = ClaimLedger(8, 2), ClaimLedger(8, 2)
    a, b = _Replica(0, ledger_a, lease=2), _Replica(1, ledger_b, lease=2)
    _round([a, b])
    assert list(b.claims.queue) == [1, 3]
    b.train(1)  # trains batch 1; never committed: b dies now
    _round([a])
    assert ledger_a.owner[[1, 3]].tolist() == [FREE, FREE]  # nothing stays leased to the dead slot
    while not ledger_a.complete:
        a.train(2)
        _round([a])
    assert sorted(a.trained) == list(range(8))  # batch 1 again, since b's update of it was never merged


def test_every_batch_exactly_once_under_random_deaths_joins_and_failed_rounds() -> None:
    """Counting what reached the common anchor: finished batches of committed rounds, over 200 random epochs."""
    rng = random.Random(0)
    for _ in range(200):
        batches = rng.randint(5, 40)
        first = ClaimLedger(batches, 4)
        live = [_Replica(slot, _copy(first), lease=rng.randint(1, 4)) for slot in range(rng.randint(1, 3))]
        merged: list[int] = []
        rounds = 0
        while not live[0].ledger.complete:
            rounds += 1
            assert rounds < 1000
            for replica in live:
                replica.train(rng.randint(0, 3))
            event = rng.random()
            if event < 0.1 and len(live) > 1:  # a replica dies: its uncommitted work is lost
                live.pop(rng.randrange(len(live)))
            elif event < 0.2 and len(live) < 4:  # a replica (a free slot) joins with a healthy peer's ledger
                used = {replica.slot for replica in live}
                slot = min(set(range(4)) - used)
                joiner = _Replica(slot, _copy(live[0].ledger))
                joiner.claims.queue.extend(joiner.ledger.leased_to(slot))  # a reused slot's leases (as `_heal`)
                live.append(joiner)
            commit = rng.random() > 0.1
            carried = [list(replica.claims.finished) for replica in live]
            _round(live, commit=commit)
            if commit:
                merged.extend(index for batch in carried for index in batch)
            ledgers = [replica.ledger.owner for replica in live]
            assert all(torch.equal(ledgers[0], other) for other in ledgers)
        assert sorted(merged) == list(range(batches))
        assert live[0].ledger.committed_batches == batches


def test_a_new_epoch_frees_every_batch_and_state_round_trips() -> None:
    ledger = ClaimLedger(3, 2)
    a = _Replica(0, ledger, lease=3)
    _round([a])
    a.train(3)
    _round([a])
    assert ledger.complete and a.claims.idle
    ledger.next_epoch(torch.tensor([True, False]))
    assert ledger.epoch == 1 and ledger.remaining() == 3 and ledger.committed_batches == 3
    assert ledger.is_member(0) and not ledger.is_member(1)
    twin = _copy(ledger)
    assert twin.state_dict()["owner"].tolist() == ledger.owner.tolist() and twin.epoch == 1


def test_slots_outside_the_ledger_are_refused() -> None:
    with pytest.raises(ValueError, match="slot 5"):
        ClaimLedger(4, 2).contribution(5, [], 1)
    with pytest.raises(ValueError, match="nothing to share"):
        ClaimLedger(0, 2)


def test_batches_a_dead_replica_left_after_the_others_ran_out_are_trained_first_next_epoch() -> None:
    """The others' data of the epoch ended (nothing free) while a replica held leases; it dies; the members meet at
    the epoch's end without those batches: they are carried into the next epoch, with their epoch's identity."""
    ledger_a, ledger_b = ClaimLedger(4, 2), ClaimLedger(4, 2)
    a, b = _Replica(0, ledger_a, lease=2), _Replica(1, ledger_b, lease=2)
    _round([a, b])  # a: 0, 2; b: 1, 3
    a.train(2)
    _round([a, b])
    assert not ledger_a.any_free() and a.claims.take() is None  # a's epoch has ended; b still holds 1 and 3
    _round([a])  # b died: its leases are free again, but a has left the epoch
    carried = ledger_a.next_epoch(torch.tensor([True, False]))
    assert carried == 2 and ledger_a.carried == [(0, 1), (0, 3)]
    assert len(ledger_a.owner) == 6 and [ledger_a.batch(i) for i in (0, 4, 5)] == [(1, 0), (0, 1), (0, 3)]
    a.claims.reset()
    while not ledger_a.complete:
        a.train(2)
        _round([a])
    assert sorted(a.trained) == [0, 0, 1, 2, 2, 3, 4, 5] and ledger_a.committed_batches == 2 + 6
