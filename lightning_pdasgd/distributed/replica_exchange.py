"""Asynchronous replica exchange: every rank's updates reach every replica, in the background.

The exchange all-reduces parameter *deltas*. All ranks keep an identical *anchor* (the replicas' common past). A
round, run by a communication thread on a process group of its own:

1. reads whether this rank asks for a consistent point, then snapshots the live parameters (each under its
   parameter's lock) and takes ``delta = snapshot - anchor``, i.e. this rank's updates not yet shared;
2. one small all-reduce: the requests, failures and SIGTERMs, the per-parameter update counts and the ranks' counts
   of trained batches (the global step count, see ``step_accounting.py``);
3. all-reduces the deltas: their sum, divided by the number of ranks under ``merge="mean"`` (the default: every
   update counts ``1/N``, as in DDP's averaged gradient; ``"sum"``: every update counts once, as on one device);
4. advances the anchor by that (identical on every rank) and moves the live parameters with it:
   ``live += anchor_new - snapshot``, which keeps this rank's updates made during the round.

So every update made on any rank reaches every replica after at most two rounds, none is lost (a local update is
in exactly one delta) and none is counted twice (the anchor moves by exactly the merged deltas). The forward and
backward threads never wait for this thread: they only contend for a parameter's lock during a copy.

Consistent points (validation, checkpoints, end of epoch and of fit): every rank drains its engine and asks for
one; the first round in which every rank asks finishes with the replicas made bitwise identical (live parameters
:= anchor, float buffers averaged, optimizer states averaged) before any main thread continues.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from datetime import timedelta
from time import monotonic  # bound once: a test or a user patching `time.monotonic` moves no engine deadline
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_pdasgd.distributed.exchange_buffers import apply_round, make_flat_groups
from lightning_pdasgd.distributed.identical_state import make_state_identical
from lightning_pdasgd.engine.metrics import EXCHANGE_CPU_FRACTION, EXCHANGE_MS, EXCHANGE_ROUNDS, REPLICA_DIVERGENCE
from lightning_pdasgd.engine.parameter_buckets import ParameterBucket
from lightning_pdasgd.errors import ConsistentPointMismatchError, RankFailedError

log = logging.getLogger(__name__)

_POLL_SECONDS = 0.05
REPLICA_MERGES = ("mean", "sum")  # how a round combines the ranks' deltas (``ReplicaExchange``'s ``merge``)
# the replicas' divergence (a metric: two passes over the deltas) is sampled every this many rounds, and at every
# consistent point
_DIVERGENCE_EVERY = 8
# the most of a core the exchange thread takes: a round's CPU time (copies, deltas, the merge, its Python under the
# GIL) is taken from the rank's training threads. Back to back, rounds took 10-14% of a rank's time on the digits MLP
# and a fifth of two ranks' throughput; spaced to this share, two ranks trained 1.35-1.4x faster at the same accuracy
# per epoch under the mean merge (benchmarks/results/two_ranks). Waiting on the network costs no CPU: it spaces
# nothing. Not under the sum merge, whose accuracy needs fresh rounds (spaced, it lost 5-15 points there).
EXCHANGE_CPU_SHARE = 0.05
CONSISTENT_POINT_KINDS = ("validation", "checkpoint", "epoch_end", "fit_end", "preempt", "rebuild", "guard")




class ReplicaExchange:
    """Owns the communication thread of one rank and the consistent-point handshake.

    Args:
        buckets: the engine's parameter buckets (live parameters, locks, versions).
        module: the LightningModule, for its buffers.
        optimizer: the user's optimizer, whose state is averaged at consistent points.
        group: a process group used by this thread only (never Lightning's default group).
        interval_s: least time between the starts of two rounds (under ``merge="mean"`` rounds are also spaced so
            that the thread's CPU time stays within ``EXCHANGE_CPU_SHARE`` of the wall time).
        timeout_s: the most any wait for a consistent point may take.
        on_error: called with any exception of the thread (the engine re-raises it in the loop thread).
        local_batches: this rank's count of trained batches (read once per round); the others' sum is
            ``remote_batches``, exact once a consistent point returns.
        merge: ``"mean"``: the anchor advances by the mean of the ranks' deltas (every update counts ``1/N``, as
            DDP's averaged gradient does); ``"sum"``: by their sum (every update counts once, as on one device).
    """

    def __init__(
        self,
        buckets: list[ParameterBucket],
        module: nn.Module,
        optimizer: Optimizer,
        group: Any,
        interval_s: float,
        timeout_s: float,
        on_error: Callable[[BaseException], None],
        local_batches: Callable[[], int] = lambda: 0,
        merge: str = "mean",
    ) -> None:
        if merge not in REPLICA_MERGES:
            raise ValueError(f"`merge` must be one of {REPLICA_MERGES}, got {merge!r}")
        self._merge = merge
        self._params = [param for bucket in buckets for param in bucket.params]
        self._module = module
        self._optimizer = optimizer
        self._group = group
        self._rank = dist.get_rank(group)
        self._world_size = dist.get_world_size(group)
        self._interval_s = interval_s
        self._timeout_s = timeout_s
        self._on_error = on_error
        self._local_batches = local_batches
        self.remote_batches = 0  # batches the other ranks trained, as of the last round (monotone)
        self._groups = make_flat_groups(buckets)
        self._device = buckets[0].device
        self._stream = torch.cuda.Stream(self._device) if self._device.type == "cuda" else None
        # ---- NCCL only (issue #13). Two NCCL communicators used from two threads deadlock when ranks issue their
        # collectives in different orders, and a collective against a dead peer blocks its kernel instead of
        # failing. So with NCCL: the control round and the update counts go over a gloo group (a dead peer drops
        # the connection and the round fails; the abort notice never waits on a GPU kernel), and after a
        # consistent point this thread issues nothing until the loop thread trains again (`resume`), so the loop
        # thread's collectives at the consistent point never overlap this thread's.
        self._nccl = dist.get_backend(group) == "nccl"
        self._control_group = (
            dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s)) if self._nccl else group
        )
        self._control_device = torch.device("cpu") if self._nccl else self._device
        self._resumed = threading.Event()
        self._request: tuple[str, bool] | None = None  # (kind, stop after it)
        self._request_lock = threading.Lock()
        self._consistent = threading.Event()
        self._wake = threading.Event()  # a consistent point or an abort ends the pause between two rounds
        self._abort = threading.Event()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._sigterm_flag = threading.Event()  # set locally when this process got SIGTERM (`note_sigterm`)
        self.sigterm_seen = threading.Event()  # some rank got SIGTERM
        self.rounds = 0
        self.round_seconds = 0.0
        self.cpu_seconds = 0.0  # CPU time of the exchange thread (its share of the core budget)
        self._started_at = monotonic()
        self.divergence = 0.0
        self._consistent_round = False  # the last round was a consistent point's

    # ----------------------------------------------------------------------------------------------- lifecycle
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="pdasgd-exchange", daemon=True)
        self._thread.start()

    @property
    def thread(self) -> threading.Thread | None:
        return self._thread

    def abort(self, timeout: float) -> None:
        """Tell the other ranks that this one failed (one last round), then stop the thread."""
        self._abort.set()
        self._wake.set()
        self.join(timeout)

    def join(self, timeout: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout)
            if not self._thread.is_alive():
                self._thread = None

    def resume(self) -> None:
        """The loop thread trains again (called at every forward): the exchange may issue collectives (NCCL)."""
        self._resumed.set()

    def _wait_for_resume(self) -> None:
        """NCCL, after a consistent point: wait until the loop thread left it (or asks for another, or aborts)."""
        while not self._resumed.wait(_POLL_SECONDS):
            if self._abort.is_set() or self._request is not None:
                return

    def note_sigterm(self) -> None:
        """This process got SIGTERM (safe in a signal handler: sets a flag that the next control round carries to
        every rank, which then all see ``sigterm_seen``)."""
        self._sigterm_flag.set()

    def metrics(self) -> dict[str, float]:
        rounds = max(self.rounds, 1)
        return {
            REPLICA_DIVERGENCE: self.divergence,
            EXCHANGE_ROUNDS: float(self.rounds),
            EXCHANGE_MS: 1000.0 * self.round_seconds / rounds,
            EXCHANGE_CPU_FRACTION: self.cpu_seconds / max(monotonic() - self._started_at, 1e-9),
        }

    # ----------------------------------------------------------------------------------------------- consistent points
    def consistent_point(self, kind: str, stop: bool, raise_if_failed: Callable[[], None]) -> None:
        """Block until every rank reached a consistent point and the replicas are identical.

        The caller has drained its engine: this rank makes no update until this returns.
        """
        if kind not in CONSISTENT_POINT_KINDS:
            raise ValueError(f"unknown consistent point {kind!r}")
        self._consistent.clear()
        if self._stream is not None:  # CUDA: the round reads what the loop's stream wrote (BatchNorm buffers)
            self._stream.wait_stream(torch.cuda.current_stream(self._device))
        with self._request_lock:
            self._request = (kind, stop)
        self._wake.set()
        wait_on_exchange(
            self._consistent, lambda: self._thread, self._timeout_s, raise_if_failed,
            f"the other ranks reached the {kind!r} consistent point", "A rank is much slower, stuck or gone.",
        )

    # ----------------------------------------------------------------------------------------------- the thread
    def _run(self) -> None:
        try:
            context = torch.cuda.stream(self._stream) if self._stream is not None else nullcontext()
            with context:
                while True:
                    started, cpu_started = monotonic(), time.thread_time()
                    if self._round():
                        return
                    self.rounds += 1
                    self.round_seconds += monotonic() - started
                    self.cpu_seconds = time.thread_time()
                    period = self._interval_s
                    if self._merge == "mean" and not self._consistent_round:  # a consistent point: not periodic
                        period = max(period, (self.cpu_seconds - cpu_started) / EXCHANGE_CPU_SHARE)
                    rest = period - (monotonic() - started)
                    if rest > 0 and self._request is None and not self._abort.is_set():
                        self._wake.wait(rest)
                    self._wake.clear()
        except BaseException as error:  # noqa: BLE001 - surfaced in the loop thread by the engine
            log.debug("pdasgd-exchange failed", exc_info=True)
            self._on_error(error)
        finally:
            self._stopped.set()

    def _control(
        self, request: tuple[str, bool] | None, aborting: bool, update_counts: list[int], own_batches: int
    ) -> tuple[bool, str | None, bool, list[int]]:
        """One small all-reduce: who asks for a consistent point (and which), who failed, who got SIGTERM, and the
        update and batch counts of the snapshot just taken; returns (consistent, kind, stop, the update counts
        summed over the ranks). ``request`` and ``aborting`` were read before the
        snapshot, so a request covers it: a rank asks only once it has drained its engine. One collective instead
        of two: each costs the round a wait for the other ranks' exchange threads, which share their cores and
        the GIL with training."""
        kinds = len(CONSISTENT_POINT_KINDS)
        world = self._world_size
        # layout: [ready, stop, sigterm, kind one-hot (kinds), failed ranks (world), update counts, own batches];
        # float64 holds every count exactly (below 2**53)
        control = torch.zeros(3 + kinds + world + len(update_counts) + 1, dtype=torch.float64)
        if request is not None:
            control[0] = 1
            control[1] = float(request[1])
            control[3 + CONSISTENT_POINT_KINDS.index(request[0])] = 1
        control[2] = float(self._sigterm_flag.is_set())
        if aborting:
            control[3 + kinds + self._rank] = 1
        control[3 + kinds + world:] = torch.tensor([*update_counts, own_batches], dtype=torch.float64)
        control = control.to(self._control_device)
        dist.all_reduce(control, group=self._control_group)
        values = control.tolist()
        counts = values[3 + kinds + world:]
        total_counts = [int(count) for count in counts[:-1]]
        self.remote_batches = max(self.remote_batches, int(counts[-1]) - own_batches)
        failed = [rank for rank in range(world) if values[3 + kinds + rank] > 0]
        if aborting:
            return False, None, True, total_counts
        if failed:
            raise RankFailedError(f"PD-ASGD: rank(s) {failed} failed; stopping this rank (rank {self._rank}) too.")
        if values[2] > 0:
            self.sigterm_seen.set()
        if values[0] < world:
            return False, None, False, total_counts
        asked = [CONSISTENT_POINT_KINDS[i] for i in range(kinds) if values[3 + i] > 0]
        if len(asked) != 1:
            raise ConsistentPointMismatchError(
                f"PD-ASGD: ranks reached different consistent points {asked}: their Lightning loops diverged."
                " With several devices, stop with `max_epochs` or `max_steps`, validate at epoch ends"
                " (`val_check_interval=1.0`) and save checkpoints at epoch ends or after validation; a callback that"
                " stops or validates one rank mid-epoch (`trainer.should_stop` from a batch hook) cannot work."
            )
        return True, asked[0], values[1] > 0, total_counts

    def _round(self) -> bool:
        """One exchange round; returns True when the thread should stop."""
        with self._request_lock:  # before the snapshot: a consistent round's snapshot holds every update
            request = self._request
        aborting = self._abort.is_set()
        own_batches = int(self._local_batches())  # before the snapshot: never ahead of the updates it covers
        snapshots: list[Tensor] = []
        local_counts: list[int] = []
        for group in self._groups:
            snapshot, counts = group.snapshot()
            snapshots.append(snapshot)
            local_counts.extend(counts)
        consistent, kind, stop, total_counts = self._control(request, aborting, local_counts, own_batches)
        self._consistent_round = consistent
        if aborting:
            return True
        deltas = [
            snapshot - (group.anchor if group.base is None else group.base)
            for snapshot, group in zip(snapshots, self._groups)
        ]
        sample_divergence = consistent or self.rounds % _DIVERGENCE_EVERY == 0
        local_deltas = [delta.clone() for delta in deltas] if sample_divergence else []
        for delta in deltas:
            dist.all_reduce(delta, group=self._group)
        if sample_divergence:
            self.divergence = self._divergence(local_deltas, deltas)
        if self._merge == "mean":
            for delta in deltas:
                delta /= self._world_size
        apply_round(self._groups, snapshots, deltas, local_counts, total_counts, consistent)
        if consistent:
            self._make_identical()
            log.debug("rank %d: consistent point %r reached", self._rank, kind)
            with self._request_lock:
                self._request = None
            if self._stream is not None:  # CUDA: the loop thread reads what this stream wrote (a rare, allowed sync)
                self._stream.synchronize()
            if self._nccl:
                self._resumed.clear()
            self._consistent.set()
            if self._nccl and not stop:
                self._wait_for_resume()
            return stop
        return False

    def _divergence(self, local: list[Tensor], summed: list[Tensor]) -> float:
        """Relative L2 distance of this replica's snapshot to the replicas' average at the same round (a metric: norms
        in the deltas' dtype, one temporary each; in float64 copies it took 0.5 s a round for a ResNet-18 on CPU)."""
        distance = 0.0
        norm = 0.0
        for own, total, group in zip(local, summed, self._groups):
            average_offset = total / self._world_size
            distance += float(torch.linalg.vector_norm(own - average_offset)) ** 2
            norm += float(torch.linalg.vector_norm(group.anchor + average_offset)) ** 2
        return math.sqrt(distance) / max(math.sqrt(norm), 1e-12)

    def _make_identical(self) -> None:
        """Average float buffers and optimizer states so that every rank holds the same training state."""
        make_state_identical(
            self._module, self._optimizer, self._params, self._rank, self._group, self._device, self._world_size
        )


def wait_on_exchange(
    event: threading.Event,
    thread: Callable[[], threading.Thread | None],
    timeout_s: float,
    raise_if_failed: Callable[[], None],
    what: str,
    hint: str,
) -> None:
    """The loop thread waits until the exchange thread sets ``event`` (``what`` happened): re-raising an engine
    error as soon as there is one, failing if the exchange thread stops, and at most ``timeout_s`` seconds."""
    deadline = monotonic() + timeout_s
    while not event.wait(_POLL_SECONDS):
        raise_if_failed()
        running = thread()
        if running is None or not running.is_alive():
            if event.is_set():  # it happened, then the thread stopped (a stopping point's last round) just now
                break
            raise RuntimeError(f"PD-ASGD: the exchange thread stopped before {what}.")
        if monotonic() > deadline:
            raise TimeoutError(f"PD-ASGD: not done within `wait_timeout` ({timeout_s:.0f} s): {what}. {hint}")
    raise_if_failed()
