"""The replica exchange when any replica may die or join: each round is a torchft quorum step.

The arithmetic is the exchange's (``distributed/replica_exchange.py``): replicas sum the deltas of their live
parameters against a common *anchor*, advance the anchor by the sum and add the other replicas' deltas to their
live values. What changes is who takes part and what a failure does. A round, on this replica's exchange thread:

1. ``start_quorum``: the lighthouse forms a quorum of the live replicas and the process group is reconfigured to
   exactly them. A replica that is new, restarted or missed a commit is behind the others' step count and takes a
   healthy peer's state inside this call (anchor, buffers, optimizer state, the claim ledger), before it
   contributes anything: its uncommitted work is dropped and the batches it had leased are trained again;
2. one all-reduce of the control vector (who asks for which consistent point, the claim ledger's contributions,
   the optimizer-state layout), then the deltas (and at a consistent point, buffers and optimizer states);
3. ``should_commit``: only if every collective succeeded does anything change. A round against a replica that
   died fails after ``timeout_s`` (the survivors' stall), changes nothing, and the next quorum leaves the dead
   replica out; its deltas since its last committed round were never merged, and its leased batches go back to
   the pool (``claim_ledger.py``). A replica that failed to commit while others committed is behind and heals at
   the next quorum.

Consistent points need every *current* participant, so a dead replica never blocks one; at a consistent round
every replica leaves with the anchor as its parameters and averaged buffers and optimizer states.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from time import monotonic
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_pdasgd.distributed.exchange_buffers import apply_round, make_flat_groups
from lightning_pdasgd.distributed.replica_exchange import CONSISTENT_POINT_KINDS, wait_on_exchange
from lightning_pdasgd.engine.metrics import EXCHANGE_MS, EXCHANGE_ROUNDS
from lightning_pdasgd.engine.parameter_buckets import ParameterBucket
from lightning_pdasgd.errors import ConfigurationError, ConsistentPointMismatchError

from . import torchft_adapter
from .replica_state import ReplicaStateTransfer

log = logging.getLogger(__name__)

_POLL_SECONDS = 0.05
# control vector: [participants, members, ready, stop, sigterm, kind one-hot..., state tensors, state elements,
#                  voters, vote flags..., members whose epoch's data ended]
_KINDS = len(CONSISTENT_POINT_KINDS)
_VOTE_FLAGS = 4
_STATE = 5 + _KINDS
_VOTERS = _STATE + 2
_EXHAUSTED = _VOTERS + 1 + _VOTE_FLAGS
_CONTROL = _EXHAUSTED + 1


class FaultTolerantExchange(ReplicaStateTransfer):
    """One exchange thread over the link's torchft manager, ledger and claims (see the module docstring).

    Args:
        link: the fit's ``FaultTolerantLink``.
        buckets: the engine's parameter buckets (float32 or float64 parameters on the CPU).
        module: the model, for its buffers.
        optimizer: the user's optimizer (its state is sent to joining replicas and averaged at consistent points).
        on_error: called with any exception of the thread (the engine re-raises it in the loop thread).
    """

    def __init__(
        self,
        link: Any,
        buckets: list[ParameterBucket],
        module: nn.Module,
        optimizer: Optimizer,
        on_error: Callable[[BaseException], None],
    ) -> None:
        for bucket in buckets:
            if bucket.device.type != "cpu" or bucket.dtype not in (torch.float32, torch.float64):
                raise ConfigurationError(
                    "PD-ASGD: `fault_tolerant=True` exchanges float32/float64 parameters on the CPU (gloo); got"
                    f" {bucket.dtype} on {bucket.device}. Train with `accelerator='cpu'` and `precision='32-true'`."
                )
        self._link = link
        self._buckets = buckets
        self._params = [param for bucket in buckets for param in bucket.params]
        self._positions = {id(param): position for position, param in enumerate(self._params)}
        self._module = module
        self._optimizer = optimizer
        self._on_error = on_error
        self._groups = make_flat_groups(buckets)
        self._unsent = [[0] * len(group.buckets) for group in self._groups]  # local updates of failed rounds
        self._request: tuple[str, bool] | None = None
        self._request_lock = threading.Lock()
        self._consistent = threading.Event()
        self._vote: list[bool] | None = None
        self._vote_result: list[bool] | None = None
        self._voted = threading.Event()
        self._abort = threading.Event()
        self._thread: threading.Thread | None = None
        self._sigterm_flag = threading.Event()
        self.sigterm_seen = threading.Event()
        self.remote_batches = 0  # the other replicas' batches in the anchor since this replica started training
        self.own_committed = 0  # this replica's batches in the anchor, same period
        self.rounds = 0
        self.failed_rounds = 0
        self.round_seconds = 0.0
        self.longest_round_s = 0.0

    # ----------------------------------------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Start from the same state as the others (a replica joining a running job takes a peer's; replicas that all
        start together take the first quorum's lowest one's), then the thread runs rounds."""
        deadline = monotonic() + self._link.wait_timeout_s
        for attempt in (self._start_together, self._round_committed):
            while not attempt():  # a replica died during the round: the next quorum leaves it out
                if monotonic() > deadline:
                    raise TimeoutError(
                        "PD-ASGD: no exchange round with the other replicas committed within `wait_timeout`"
                        f" ({self._link.wait_timeout_s:.0f} s): they keep failing or the lighthouse is unreachable."
                    )
        with self._link.lock:
            self._link.committed_at_start = self._link.ledger.committed_batches - self.own_committed
            self.remote_batches = 0  # counted from here: the job's batches so far are this fit's starting step
        self._thread = threading.Thread(target=self._run, name="pdasgd-ft-exchange", daemon=True)
        self._thread.start()

    def _round_committed(self) -> bool:
        """The joining round: this replica asks for batches even if it is not (yet) a member of the epoch."""
        failed = self.failed_rounds
        self._round(joining=True)
        return self.failed_rounds == failed

    @property
    def thread(self) -> threading.Thread | None:
        return self._thread

    def abort(self, timeout: float) -> None:
        """This replica stops: the others drop it from their next quorum (no goodbye needed)."""
        self._abort.set()
        self.join(timeout)
        self._link.close()

    def join(self, timeout: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout)
            if not self._thread.is_alive():
                self._thread = None

    def resume(self) -> None:
        """Training again after a consistent point (nothing to do on gloo)."""

    def note_sigterm(self) -> None:
        self._sigterm_flag.set()

    def metrics(self) -> dict[str, float]:
        return {
            EXCHANGE_ROUNDS: float(self.rounds),
            EXCHANGE_MS: 1000.0 * self.round_seconds / max(self.rounds, 1),
        }

    # ----------------------------------------------------------------------------------------------- meetings
    def consistent_point(self, kind: str, stop: bool, raise_if_failed: Callable[[], None]) -> None:
        """Block until every live member of the epoch asked for ``kind`` and the replicas are identical."""
        if kind not in CONSISTENT_POINT_KINDS:
            raise ValueError(f"unknown consistent point {kind!r}")
        self._consistent.clear()
        with self._request_lock:
            self._request = (kind, stop)
        self._wait(self._consistent, f"the {kind!r} consistent point", raise_if_failed)
        if stop:
            self.join(self._link.wait_timeout_s)
            if kind in ("fit_end", "preempt"):
                self._link.close()

    def vote(self, flags: Sequence[bool]) -> list[bool]:
        """For each flag, whether any live member set it (all members vote at the same consistent point)."""
        if len(flags) > _VOTE_FLAGS:
            raise ValueError(f"at most {_VOTE_FLAGS} flags per vote")
        self._voted.clear()
        self._vote = list(flags)
        self._wait(self._voted, "a decision of the divergence guard", lambda: None)
        assert self._vote_result is not None
        return self._vote_result[: len(flags)]

    def _wait(self, event: threading.Event, what: str, raise_if_failed: Callable[[], None]) -> None:
        wait_on_exchange(
            event, lambda: self._thread, self._link.wait_timeout_s, raise_if_failed,
            f"the live replicas reached {what}", "A live replica is stuck, or the lighthouse unreachable.",
        )

    # ----------------------------------------------------------------------------------------------- the thread
    def _run(self) -> None:
        try:
            while not self._abort.is_set():
                started = monotonic()
                stop = self._round()
                # a failed round included: the longest is the stall a dead replica caused
                self.longest_round_s = max(self.longest_round_s, monotonic() - started)
                if stop:
                    return
                rest = self._link.interval_s - (monotonic() - started)
                if rest > 0 and self._request is None and self._vote is None and not self._abort.is_set():
                    time.sleep(rest)
        except BaseException as error:  # noqa: BLE001 - surfaced in the loop thread by the engine
            log.debug("pdasgd-ft-exchange failed", exc_info=True)
            self._on_error(error)

    def _control(self, member: bool, exhausted: bool, state_tensors: list[Tensor]) -> Tensor:
        with self._request_lock:
            request = self._request
        control = torch.zeros(_CONTROL, dtype=torch.int64)
        control[0] = 1
        control[1] = int(member)
        if request is not None and member:
            control[2] = 1
            control[3] = int(request[1])
            control[5 + CONSISTENT_POINT_KINDS.index(request[0])] = 1
        control[4] = int(self._sigterm_flag.is_set())
        control[_STATE] = len(state_tensors)
        control[_STATE + 1] = sum(tensor.numel() for tensor in state_tensors)
        control[_EXHAUSTED] = int(member and exhausted)
        vote = self._vote
        if vote is not None and member:
            control[_VOTERS] = 1
            for position, flag in enumerate(vote):
                control[_VOTERS + 1 + position] = int(flag)
        return control

    def _round(self, joining: bool = False) -> bool:
        """One quorum step; returns True when the thread should stop. Only the epoch's members ask for batches
        (and a replica in its joining round, which becomes a member if it is granted one)."""
        started = monotonic()
        link = self._link
        manager = link.manager
        manager.start_quorum()  # may heal this replica (`heal`) before anything below reads its state
        link.participants = manager.num_participants()
        link.participating_rank = manager.participating_rank()
        link.on_quorum()
        state_tensors = self._optimizer_state_tensors()
        with link.lock:  # a batch is in the contribution only if its updates are in the snapshot
            member = link.ledger.is_member(link.claims.slot) or not bool(link.ledger.members.any())
            ledger_part = link.claims.contribute(link.ledger, link.finished_total(), asking=member or joining)
            exhausted = link.claims.exhausted
            snapshots, local_counts = [], []
            for group, unsent in zip(self._groups, self._unsent):
                snapshot, counts = group.snapshot()
                snapshots.append(snapshot)
                local_counts.append([count + carried for count, carried in zip(counts, unsent)])
        summed = torch.cat([self._control(member, exhausted, state_tensors), ledger_part])
        manager.allreduce(summed, reduce_op=torchft_adapter.sum_op()).wait()
        if manager.errored() is not None:  # a replica died: nothing changes; the next quorum leaves it out
            manager.should_commit()  # votes no: the failure is counted, and the next quorum reconfigures the group
            return self._failed(local_counts)
        values = summed[:_CONTROL].tolist()
        members = values[1]
        kinds = [CONSISTENT_POINT_KINDS[i] for i in range(_KINDS) if values[5 + i] > 0]
        consistent = members > 0 and values[2] == members
        if consistent and len(kinds) != 1:
            raise ConsistentPointMismatchError(
                f"PD-ASGD: live replicas reached different consistent points {kinds}: their Lightning loops diverged."
            )
        voted = members > 0 and values[_VOTERS] == members
        same_layout = values[_STATE] == values[0] * len(state_tensors) and values[_STATE + 1] == values[0] * sum(
            tensor.numel() for tensor in state_tensors
        )

        deltas = [snapshot - group.anchor for snapshot, group in zip(snapshots, self._groups)]
        counts = torch.tensor([count for group in local_counts for count in group], dtype=torch.int64)
        works = [manager.allreduce(delta, reduce_op=torchft_adapter.sum_op()) for delta in deltas]
        works.append(manager.allreduce(counts, reduce_op=torchft_adapter.sum_op()))
        averaged_buffers: list[Tensor] = []
        averaged_state: list[Tensor] = []
        largest_counts: list[Tensor] = []
        if consistent:  # members average; a replica waiting for the next epoch adds nothing and takes the average
            averaged_buffers = [buffer.detach().clone() * int(member) for buffer in self._float_buffers()]
            if same_layout:
                averaged_state = [tensor.detach().clone() * int(member) for tensor in state_tensors]
            works += [
                manager.allreduce(tensor, reduce_op=torchft_adapter.sum_op())
                for tensor in [*averaged_buffers, *averaged_state]
            ]
            largest_counts = [buffer.detach().clone() for buffer in self._integer_buffers()]  # num_batches_tracked
            works += [manager.allreduce(tensor, reduce_op=torchft_adapter.max_op()) for tensor in largest_counts]
        for work in works:
            work.wait()
        if not manager.should_commit():  # some collective failed (torchft votes no for an errored replica)
            return self._failed(local_counts)

        self._unsent = [[0] * len(group.buckets) for group in self._groups]
        if self._link.merge == "mean":  # replicas outside the epoch's members trained nothing: their deltas are 0
            for delta in deltas:
                delta /= max(members, 1)
        flat_local = [count for group in local_counts for count in group]
        apply_round(self._groups, snapshots, deltas, flat_local, counts.tolist(), consistent)
        with link.granted:
            ledger = link.ledger
            self.own_committed += len(link.claims.in_round)
            grants = ledger.apply(summed[_CONTROL:])
            link.claims.committed(grants)
            if consistent and values[_EXHAUSTED] == members:  # the members met after the epoch's data ended
                carried = ledger.next_epoch(summed[_CONTROL : _CONTROL + ledger.slots] > 0)
                if carried:
                    log.warning(
                        "PD-ASGD: %d batch(es) of epoch %d were left by a replica that died after the others had"
                        " taken the epoch's last batches; they are trained first in epoch %d.",
                        carried, ledger.epoch - 1, ledger.epoch,
                    )
                link.claims.reset()
            link.granted.notify_all()
            self.remote_batches = max(
                self.remote_batches, ledger.committed_batches - link.committed_at_start - self.own_committed
            )
        if values[4] > 0:
            self.sigterm_seen.set()
        if voted:
            self._vote_result = [value > 0 for value in values[_VOTERS + 1 :]]
            self._vote = None
            self._voted.set()
        self.rounds += 1
        self.round_seconds += monotonic() - started
        if not consistent:
            return False
        with torch.no_grad():
            for buffer, total in zip(self._float_buffers(), averaged_buffers):
                buffer.copy_(total / members)
            for tensor, total in zip(state_tensors, averaged_state):
                tensor.copy_(total / members)
            for buffer, largest in zip(self._integer_buffers(), largest_counts):
                buffer.copy_(largest)
        if kinds == ["fit_end"] and self._link.ledger.carried:
            log.warning(
                "PD-ASGD: the fit ended before %d batch(es) left by a replica that died were trained again.",
                len(self._link.ledger.carried),
            )
        with self._request_lock:
            self._request = None
        log.debug(
            "PD-ASGD replica %d: consistent %s; own %d remote %d committed %d start %d",
            link.claims.slot, kinds, self.own_committed, self.remote_batches, link.ledger.committed_batches,
            link.committed_at_start,
        )
        self._consistent.set()
        return bool(values[3] > 0)

    def _failed(self, local_counts: list[list[int]]) -> bool:
        """A round that changes nothing: its local updates are still in this replica's delta (counted next time)."""
        self.failed_rounds += 1
        self._unsent = local_counts
        return False
