"""Exact batch claiming when replicas die and join: a ledger every live replica holds identically.

The store-based claiming of ``distributed/claiming.py`` lives in rank 0's key-value store and dies with it. Here the
epoch's claims are replicated state, changed only by committed exchange rounds (``fault_tolerant_exchange.py``):

* every batch of the epoch is ``FREE``, ``DONE`` (its update is in the replicas' common anchor) or leased to one
  replica *slot*;
* in a round, every participant contributes its presence, the batches it finished since its last committed round,
  and how many more it wants. The contributions are summed by one all-reduce, and every participant then applies
  the same sum to the same ledger: finished batches become ``DONE``, the leases of slots absent from the round go
  back to ``FREE`` (a dead replica's work since its last committed round is lost, and its batches are trained again
  by the survivors), and ``FREE`` batches are granted in index order, one per asking slot in turn;
* the epoch's *members* are the slots present when it started and those granted a batch since. Only members train
  this epoch and meet at its consistent points; a replica that joins when nothing is left to grant waits for the
  next epoch;
* a round that does not commit changes nothing, and its finished batches are contributed again in the next one.

So no batch is trained twice except a dead replica's uncommitted ones, and none is skipped. ``LocalClaims`` is one
replica's side: its leased queue, the batches it is training, and those finished but not yet committed.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

FREE = -1
DONE = -2


class ClaimLedger:
    """The current epoch's batches and who trains them (identical on every live replica after every commit).

    Args:
        epoch_batches: batches in one epoch, all replicas together.
        slots: the most replica slots (a replica's slot is its stable index, ``0 <= slot < slots``).
    """

    def __init__(self, epoch_batches: int, slots: int, epoch: int = 0, seed: int = 0) -> None:
        if epoch_batches <= 0 or slots <= 0:
            raise ValueError(f"ClaimLedger: nothing to share ({epoch_batches} batches, {slots} slots).")
        self.epoch_batches = epoch_batches
        self.slots = slots
        self.epoch = epoch
        self.seed = seed  # orders every epoch's permutation (the first quorum's primary's, like rank 0's)
        self.owner = torch.full((epoch_batches,), FREE, dtype=torch.int64)
        # batches of the previous epoch a dead replica left untrained, trained first in this one: (epoch, index),
        # as entries ``epoch_batches + k`` of ``owner``
        self.carried: list[tuple[int, int]] = []
        self.members = torch.zeros(slots, dtype=torch.bool)  # slots that train this epoch
        self.committed_batches = 0  # batches DONE over the whole fit (all epochs): the job's step count

    # ------------------------------------------------------------------------------------------- a round
    @property
    def width(self) -> int:
        """Length of one contribution: presence and wants per slot, then one flag per batch."""
        return 2 * self.slots + len(self.owner)

    def contribution(self, slot: int, finished: list[int], wanted: int) -> torch.Tensor:
        """What replica ``slot`` adds to the round's sum."""
        if not 0 <= slot < self.slots:
            raise ValueError(f"ClaimLedger: replica slot {slot} is outside 0..{self.slots - 1}.")
        vector = torch.zeros(self.width, dtype=torch.int64)
        vector[slot] = 1
        vector[self.slots + slot] = max(int(wanted), 0)
        for index in finished:
            vector[2 * self.slots + index] = 1
        return vector

    def apply(self, summed: torch.Tensor) -> dict[int, list[int]]:
        """Apply one committed round's summed contributions; returns the new leases per slot (batch indices)."""
        present = summed[: self.slots] > 0
        wanted = summed[self.slots : 2 * self.slots].tolist()
        finished = summed[2 * self.slots :] > 0
        owner = self.owner
        newly_done = finished & (owner != DONE)
        self.committed_batches += int(newly_done.sum())
        owner[newly_done] = DONE
        leased = owner >= 0
        absent_owner = leased & ~present[owner.clamp(min=0)]
        owner[absent_owner] = FREE
        free = (owner == FREE).nonzero().flatten().tolist()
        if not bool(self.members.any()):  # the fit's first round: everyone present starts the epoch
            self.members |= present
        grants: dict[int, list[int]] = {}
        asking = {slot: int(wanted[slot]) for slot in range(self.slots) if present[slot] and wanted[slot] > 0}
        position = 0
        while asking and position < len(free):  # one batch per asking slot in turn: every asker gets one first
            for slot in list(asking):
                if position >= len(free):
                    break
                grants.setdefault(slot, []).append(free[position])
                position += 1
                asking[slot] -= 1
                if asking[slot] == 0:
                    del asking[slot]
        for slot, taken in grants.items():
            owner[taken] = slot
            self.members[slot] = True
        return grants

    def is_member(self, slot: int) -> bool:
        return bool(self.members[slot])

    # ------------------------------------------------------------------------------------------- epochs
    @property
    def complete(self) -> bool:
        """Every batch of the epoch is in the common anchor."""
        return bool((self.owner == DONE).all())

    def any_free(self) -> bool:
        return bool((self.owner == FREE).any())

    def remaining(self) -> int:
        return int((self.owner != DONE).sum())

    def leased_to(self, slot: int) -> list[int]:
        return (self.owner == slot).nonzero().flatten().tolist()

    def next_epoch(self, present: torch.Tensor) -> int:
        """The members met after the epoch's data ended: a new epoch, every batch free, every present slot a member.

        Batches not done (a replica died holding them after the others had taken the epoch's last ones) are carried
        into the new epoch and trained first; returns how many."""
        left = (self.owner != DONE).nonzero().flatten().tolist()
        carried = [self.batch(index) for index in left]
        self.epoch += 1
        self.carried = carried
        self.owner = torch.full((self.epoch_batches + len(carried),), FREE, dtype=torch.int64)
        self.members = present.clone().bool()
        return len(carried)

    def batch(self, index: int) -> tuple[int, int]:
        """Which epoch's permutation, and which batch of it, entry ``index`` of ``owner`` stands for."""
        if index < self.epoch_batches:
            return self.epoch, index
        return self.carried[index - self.epoch_batches]

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch_batches": self.epoch_batches,
            "slots": self.slots,
            "epoch": self.epoch,
            "seed": self.seed,
            "owner": self.owner.clone(),
            "carried": list(self.carried),
            "members": self.members.clone(),
            "committed_batches": self.committed_batches,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch_batches = int(state["epoch_batches"])
        self.slots = int(state["slots"])
        self.epoch = int(state["epoch"])
        self.seed = int(state["seed"])
        self.owner = state["owner"].clone()
        self.carried = [tuple(pair) for pair in state["carried"]]
        self.members = state["members"].clone()
        self.committed_batches = int(state["committed_batches"])


@dataclass
class LocalClaims:
    """One replica's side of the ledger: what it may train next, what it trains, what awaits a commit.

    The loop thread takes batches (``take``) and reports finished ones (``finish``); the exchange thread builds the
    round's contribution (``contribute``) and, on commit, ``committed`` and ``granted``. The caller serialises them
    (one lock).
    """

    slot: int
    lease: int = 4  # batches to hold ahead of training
    queue: deque[int] = field(default_factory=deque)  # leased, not yet taken
    training: deque[int] = field(default_factory=deque)  # taken, not yet finished (in order)
    finished: list[int] = field(default_factory=list)  # finished since the last committed round
    in_round: list[int] = field(default_factory=list)  # of those, what the running round contributed
    finished_total: int = 0  # batches finished, as counted by the caller (`contribute`'s ``finished_total``)
    exhausted: bool = False  # this replica's data of the epoch has ended (nothing was left to grant)

    def take(self) -> int | None:
        if not self.queue:
            return None
        index = self.queue.popleft()
        self.training.append(index)
        return index

    def untake(self, count: int) -> None:
        """The newest ``count`` batches taken will not be trained after all: back to the front of the queue."""
        for _ in range(min(count, len(self.training))):
            self.queue.appendleft(self.training.pop())

    def finish(self, count: int = 1) -> None:
        """The oldest ``count`` batches in training have updated every parameter of this replica."""
        for _ in range(min(count, len(self.training))):
            self.finished.append(self.training.popleft())
        self.finished_total += count

    def contribute(self, ledger: ClaimLedger, finished_total: int | None = None, asking: bool = True) -> torch.Tensor:
        """This round's contribution; ``finished_total``: how many taken batches have finished since the fit (or the
        last reset) started, read *before* the round's snapshot, so that every batch it marks is in the snapshot.
        ``asking``: whether to ask for batches (a replica waiting for the next epoch must not hold this one's)."""
        if finished_total is not None and finished_total > self.finished_total:
            self.finish(finished_total - self.finished_total)
        self.in_round = list(self.finished)
        wanted = self.lease - len(self.queue) if asking else 0
        return ledger.contribution(self.slot, self.in_round, wanted)

    def committed(self, grants: dict[int, list[int]]) -> None:
        """The round committed: what it carried is DONE, and this replica's new leases join the queue."""
        carried = set(self.in_round)
        self.finished = [index for index in self.finished if index not in carried]
        self.in_round = []
        self.queue.extend(grants.get(self.slot, []))

    def reset(self) -> None:
        """A new epoch, or this replica took another's state (healing): nothing leased, nothing pending.

        Batches still in training finish later in the caller's count; they are nobody's claims any more."""
        self.finished_total += len(self.training)
        self.exhausted = False
        self.queue.clear()
        self.training.clear()
        self.finished.clear()
        self.in_round = []

    @property
    def idle(self) -> bool:
        """Nothing leased and nothing in training or awaiting a commit."""
        return not self.queue and not self.training and not self.finished
