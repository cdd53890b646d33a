"""The session's way to the other replicas in the fault-tolerant mode (``engine/peers.py``'s ``PeerLink``).

It outlives the exchanges it connects (a rebuild or a divergence-guard recovery stops one exchange and connects
another): the torchft manager, the claim ledger and this replica's claims belong to the whole fit.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from time import monotonic
from typing import Any

from torch import nn
from torch.optim import Optimizer

from lightning_pdasgd.engine.parameter_buckets import ParameterBucket

from . import torchft_adapter
from .claim_ledger import ClaimLedger, LocalClaims
from .fault_tolerant_exchange import FaultTolerantExchange

_POLL_SECONDS = 0.05


class FaultTolerantLink:
    """Args:
    settings: the lighthouse, this replica's slot and the timeouts.
    epoch_batches: batches in one epoch, all replicas together.
    seed: orders the epochs' permutations (every replica takes the first quorum's primary's).
    interval_s: least time between the starts of two exchange rounds.
    wait_timeout_s: the most a consistent point or a wait for a batch may take.
    finished_total: how many batches this replica has finished (every update applied) since the fit started.
    lease: batches a replica holds ahead of its training.
    merge: how a round combines the members' updates: ``"mean"`` (divided by the members that took part) or
        ``"sum"`` (``ReplicaExchange``'s ``merge``).
    """

    def __init__(
        self,
        settings: torchft_adapter.FaultToleranceSettings,
        epoch_batches: int,
        seed: int,
        interval_s: float,
        wait_timeout_s: float,
        finished_total: Callable[[], int],
        lease: int = 4,
        merge: str = "mean",
    ) -> None:
        self.settings = settings
        self.merge = merge
        self.interval_s = interval_s
        self.wait_timeout_s = wait_timeout_s
        self.finished_total = finished_total
        self.ledger = ClaimLedger(epoch_batches, settings.max_replicas, seed=seed)
        self.claims = LocalClaims(settings.slot, lease=lease)
        self.lock = threading.RLock()  # the ledger and claims; held across a round's snapshot and contribution
        self.granted = threading.Condition(self.lock)  # a round changed the ledger
        self.manager: Any = None
        self._store: Any = None
        self._exchange: FaultTolerantExchange | None = None
        self.participating_rank: int | None = None  # this replica's rank in the last quorum (0: the lowest live)
        self.participants = 0
        self.on_quorum: Callable[[], None] = lambda: None  # after every quorum (the integration follows the ranks)
        # what else a joining replica takes (the integration's: Lightning's callbacks' states), and how it loads it
        self.save_extra: Callable[[], Any] = lambda: None
        self.load_extra: Callable[[Any], None] = lambda state: None
        self.heals = 0
        self.committed_at_start = 0  # the job's batches before this replica started training (a joiner's)

    # ------------------------------------------------------------------------------------------- PeerLink
    def make_identical(self, module: nn.Module) -> None:
        """Nothing here: the exchange's first round heals this replica from the first quorum's primary."""

    def connect(
        self,
        buckets: list[ParameterBucket],
        module: nn.Module,
        optimizer: Optimizer,
        on_error: Callable[[BaseException], None],
    ) -> FaultTolerantExchange:
        if self.manager is None:
            self.manager, self._store = torchft_adapter.make_manager(self.settings, self._state_for_peer, self._heal)
        self._exchange = FaultTolerantExchange(self, buckets, module, optimizer, on_error)
        return self._exchange

    def any_rank(self, flags: Sequence[bool]) -> list[bool]:
        """For each flag, whether it is set on any member (decided in the next committed round)."""
        assert self._exchange is not None
        return self._exchange.vote(flags)

    def close(self) -> None:
        manager, self.manager = self.manager, None
        if manager is not None:
            manager.shutdown(wait=False)

    # ------------------------------------------------------------------------------------------- healing
    def _state_for_peer(self) -> dict[str, Any]:
        assert self._exchange is not None
        return self._exchange.state_for_peer()

    def _heal(self, state: dict[str, Any]) -> None:
        assert self._exchange is not None
        self.heals += 1
        self._exchange.heal(state)

    # ------------------------------------------------------------------------------------------- claims
    def member_epoch(self) -> int:
        """The epoch this replica trains next: the ledger's if it is a member, else the one after."""
        with self.lock:
            ledger = self.ledger
            return ledger.epoch if ledger.is_member(self.claims.slot) else ledger.epoch + 1

    def wait_for_replicas(self, count: int, raise_if_failed: Callable[[], None] = lambda: None) -> None:
        """Wait until at least ``count`` replicas are in the quorum (checked after every committed round), e.g. to
        start only when every replica has joined; at most ``wait_timeout``."""
        deadline = monotonic() + self.wait_timeout_s
        with self.granted:
            while self.participants < count:
                if monotonic() > deadline:
                    raise TimeoutError(f"PD-ASGD: {count} replicas were not in the quorum within `wait_timeout`.")
                self.granted.wait(_POLL_SECONDS)
                raise_if_failed()

    def untake(self, count: int) -> None:
        """The last ``count`` batches taken will not be trained: they go back to the front of this replica's queue."""
        with self.lock:
            self.claims.untake(count)

    def take_batch(self, epoch: int, raise_if_failed: Callable[[], None]) -> int | None:
        """The next batch index of ``epoch`` this replica trains, or ``None`` when none is left to grant.

        Waits for the epoch to start (a replica that joined when nothing was left to grant) and for a round to grant
        more. It ends the epoch's data as soon as every batch is done or leased (Lightning asks for the next batch
        before it trains the one it holds, so waiting for the others' leases to finish would wait for itself).
        """
        deadline = monotonic() + self.wait_timeout_s
        with self.granted:
            while True:
                ledger = self.ledger
                if ledger.epoch == epoch:
                    index = self.claims.take()
                    if index is not None:
                        return index
                    if not ledger.any_free():
                        self.claims.exhausted = True
                        return None
                elif ledger.epoch > epoch:
                    raise RuntimeError(
                        f"PD-ASGD: this replica's loop is at epoch {epoch} but the replicas' ledger at {ledger.epoch}."
                    )
                exchange = self._exchange
                if exchange is None or exchange.thread is None or not exchange.thread.is_alive():
                    raise RuntimeError("PD-ASGD: the fault-tolerant exchange stopped while a batch was awaited.")
                if monotonic() > deadline:
                    raise TimeoutError(
                        f"PD-ASGD: no batch of epoch {epoch} granted within `wait_timeout` ({self.wait_timeout_s:.0f}"
                        " s): the lighthouse formed no quorum, or the other replicas stopped."
                    )
                self.granted.wait(_POLL_SECONDS)
                raise_if_failed()
