"""One fit's engine: everything that exists only while ``trainer.fit`` trains, created and shut down together.

The strategy holds one optional ``FitSession`` instead of a dozen fields that are set when training starts and
cleared when it ends. The session owns the backward engine and its threads, the layer-wise updater, the CUDA
streams, the statistics, the thread-ratio autotuner, the replica exchange (several devices) and the thread
settings it changed, and gives them back in ``shutdown``.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from functools import partial
from time import perf_counter
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_pdasgd.config import PDASGDConfig
from lightning_pdasgd.distributed.replica_exchange import ReplicaExchange
from lightning_pdasgd.engine import _torch_internals, cuda_streams
from lightning_pdasgd.engine.autotune import (
    Candidate,
    ThreadAutotuner,
    default_candidates,
    intra_op_threads_per_thread,
    plan_trials,
)
from lightning_pdasgd.engine.backward_threads import BackwardEngine, BackwardWork
from lightning_pdasgd.engine.bucket_optimizer import hyperparameter_snapshot
from lightning_pdasgd.engine.compensation import resolve as resolve_compensation
from lightning_pdasgd.engine.divergence_guard import DivergenceGuard, Trip
from lightning_pdasgd.engine.layerwise_updates import LayerwiseUpdater
from lightning_pdasgd.engine.lazy_reads import add_unread_note
from lightning_pdasgd.engine.metrics import EngineStats, batch_size_of, describe_session, log_window
from lightning_pdasgd.engine.parameter_changes import ParameterSetFingerprint
from lightning_pdasgd.engine.weight_stash import WeightStash

log = logging.getLogger(__name__)

_ABORT_NOTICE_SECONDS = 30.0  # how long a failing rank tries to tell the others before it exits anyway
_SWITCH_INTERVAL_S = 0.001


class FitSession:
    """The engine of one fit on one rank.

    Args:
        config: the strategy's validated settings.
        module: the LightningModule being trained.
        optimizer: the user's (only) optimizer.
        device: this rank's device.
        stats: where the engine's counters go (kept by the strategy after fit).
        clip_value: ``gradient_clip_val`` with the ``"value"`` algorithm, applied per parameter.
        clip_norm: ``gradient_clip_val`` with the ``"norm"`` algorithm, applied per backward (``updates.py``).
        accumulate: the fit accumulates gradients (``accumulation.py``).
    """

    def __init__(
        self,
        config: PDASGDConfig,
        module: nn.Module,
        optimizer: Optimizer,
        device: torch.device,
        stats: EngineStats,
        clip_value: float | None,
        clip_norm: float | None = None,
        accumulate: bool = False,
    ) -> None:
        self.config = config
        self._module = module
        self._optimizer = optimizer
        self._device = device
        self.stats = stats
        self.backward_threads = config.backward_threads
        self.max_in_flight = config.in_flight
        self._clip_value = clip_value
        self._clip_norm = clip_norm
        self._accumulate = accumulate
        self._compensation = resolve_compensation(config.staleness_compensation)  # fresh state for each fit
        self.updater = self._build_updater(optimizer)
        self._streams = cuda_streams.StreamPool(device, self.max_in_flight)
        self._saved_num_threads = torch.get_num_threads()
        self.intra_op_threads = self._intra_op_threads(self.backward_threads, self.max_in_flight, None)
        self.engine = BackwardEngine(
            self._run_backward,
            backward_threads=self.backward_threads,
            max_in_flight=self.max_in_flight,
            wait_timeout=config.wait_timeout,
            thread_setup=partial(torch.set_num_threads, self.intra_op_threads),
        )
        self.exchange: ReplicaExchange | None = None
        self._exchange_group: Any = None
        self.tuner: ThreadAutotuner | None = None
        self.plain_steps = False  # the autotuner chose (or is timing) the plain synchronous step
        self.in_sync = True  # with several devices: replicas identical (no step since the last consistent point)
        # called after every consistent point the ranks met at (several devices), with its kind: step accounting
        self.on_consistent: Callable[[str], None] | None = None
        self._local_batches: Callable[[], int] = lambda: 0
        self._current: tuple[WeightStash, Any] | None = None  # the forward whose loss is not handed off yet
        # the guard watches asynchrony: a run configured with one loss in flight is exactly plain Lightning's
        self.guard = DivergenceGuard() if config.divergence_guard and config.in_flight > 1 else None
        self._pending_trip: Trip | None = None  # several devices: this rank's trip, acted on at the guard point
        self._step = 0  # the global step of the latest hand-off (for the guard's messages and snapshots)
        self._saved_switch_interval: float | None = sys.getswitchinterval()
        self.started_at = perf_counter()

    @classmethod
    def for_fit(
        cls,
        config: PDASGDConfig,
        trainer: Any,
        optimizer: Optimizer,
        device: torch.device,
        stats: EngineStats,
        accumulate: bool = False,
    ) -> FitSession:
        """The session of ``trainer``'s fit, with its ``gradient_clip_val`` by value or by norm."""
        clip = float(trainer.gradient_clip_val) if trainer.gradient_clip_val else None
        by_value = trainer.gradient_clip_algorithm == "value"
        module = trainer.lightning_module
        return cls(
            config, module, optimizer, device, stats, clip if by_value else None, None if by_value else clip, accumulate
        )

    # ------------------------------------------------------------------------------------------- lifecycle
    def start_for(self, world_size: int, run_steps: float) -> str:
        """Start the engine (autotuning when a thread count is "auto"); returns the line to log at INFO."""
        plan = None
        if self.config.autotune:
            candidates = default_candidates(self._device, allow_synchronous=world_size == 1)
            plan = plan_trials(candidates, self.config.autotune_steps, run_steps)
        self.start(plan)
        short = self.config.autotune and plan is None
        return ("PD-ASGD: the run is too short for autotuning; keeping the configured thread counts.\n"
                if short else "") + describe_session(self, world_size)

    def start(self, autotune: tuple[list[Candidate], int] | None = None) -> None:
        # backward threads need the GIL for every update; Python's default 5 ms switch interval would make each
        # one wait behind the loop thread's Python work
        sys.setswitchinterval(min(self._saved_switch_interval or _SWITCH_INTERVAL_S, _SWITCH_INTERVAL_S))
        torch.set_num_threads(self.intra_op_threads)  # the forward thread's share of the cores
        self.engine.start()
        if autotune is not None:
            candidates, steps_per_trial = autotune
            self.tuner = ThreadAutotuner(candidates, steps_per_trial, self.config.autotune_max_staleness)
        log.debug(
            "FitSession: engine started (%d backward threads, max_in_flight=%d, %d intra-op threads per thread,"
            " layerwise=%s, %d buckets)",
            self.backward_threads,
            self.max_in_flight,
            self.intra_op_threads,
            self.updater.layerwise,
            len(self.updater.buckets),
        )

    def _intra_op_threads(self, backward_threads: int, max_in_flight: int, explicit: int | None) -> int:
        """Intra-op threads for each engine thread: explicit, the user's setting, or the core budget."""
        chosen = explicit or self.config.intra_op_threads
        if chosen is not None:
            return chosen
        return intra_op_threads_per_thread(self._saved_num_threads, backward_threads, max_in_flight)

    def _build_updater(
        self, optimizer: Optimizer, detached: frozenset[int] = frozenset(), shared: frozenset[int] = frozenset()
    ) -> LayerwiseUpdater:
        config = self.config
        updater = LayerwiseUpdater(
            self._module,
            optimizer,
            layerwise=config.layerwise,
            clip_value=self._clip_value,
            clip_norm=self._clip_norm,
            accumulate=self._accumulate,
            log_grad_norm=config.log_grad_norm,
            nonfinite=config.nonfinite,
            grad_norms=config.divergence_guard,
            bucket_numel=config.bucket_numel,
            detached=detached,
            shared=shared,
            compensation=self._compensation,
            lazy_reads=config.lazy_reads,
        )
        self._fingerprint = ParameterSetFingerprint(self._module, optimizer, updater.buckets)
        return updater

    def follow_parameter_changes(self, optimizers: list[Optimizer], recheck: Callable[[], None]) -> None:
        """Fine-tuning, pruning, ``requires_grad`` toggles, a re-created optimizer: rebuild before this forward.

        ``recheck`` runs the setup checks on the (possibly new) optimizer first; the plain step (chosen by "auto")
        reads the parameter set as it is and needs nothing.
        """
        if self.plain_steps:
            return
        change = self._fingerprint.difference(optimizers[0]) if len(optimizers) == 1 else "the optimizers changed"
        if change is None:
            return
        recheck()
        log.debug("PD-ASGD: %s; rebuilding the engine's buckets", change)
        self.rebuild(optimizers[0])

    def rebuild(self, optimizer: Optimizer) -> None:
        """Follow a changed parameter set: drain, rebuild buckets, stashes and per-bucket optimizers.

        Optimizer state lives in the user's optimizer, keyed by parameter, so it carries over. With several
        devices every rank must make the same change (callbacks and hooks run on every rank): the ranks meet at a
        consistent point, the exchange stops, and a new one starts over the new buckets.
        """
        exchanging = self.exchange is not None
        if exchanging:
            self.reach_consistent_point("rebuild", stop=True)
            self.exchange.join(self.config.wait_timeout)  # type: ignore[union-attr]
            self.exchange = None
        self.drain()
        self._optimizer = optimizer
        self.updater.close()
        self._compensation.reset()  # its running state is per bucket, and the buckets are about to change
        trained_before = frozenset(id(param) for bucket in self.updater.buckets for param in bucket.params)
        shared = self.updater.storage_given_from_outside()
        self.updater = self._build_updater(optimizer, detached=trained_before, shared=shared)
        if self.guard is not None:  # the good state holds the old parameter set
            self.guard.restart()
        if exchanging:
            self.start_exchange(self._exchange_group)

    def start_exchange(self, group: Any, local_batches: Callable[[], int] | None = None) -> None:
        """Several devices: make the replicas identical (as DDP does), then exchange updates in the background.

        ``local_batches`` is this rank's count of trained batches since fit started, which every round sums over
        the ranks (``steps.py``); a restarted exchange (``rebuild``) keeps it.
        """
        self._exchange_group = group
        if local_batches is not None:
            self._local_batches = local_batches
        for tensor in [*self._module.parameters(), *self._module.buffers()]:
            torch.distributed.broadcast(tensor.data, src=0)
        self.exchange = ReplicaExchange(
            self.updater.buckets,
            self._module,
            self._optimizer,
            group=group,
            interval_s=self.config.exchange_interval,
            timeout_s=self.config.wait_timeout,
            on_error=self.engine.fail,
            local_batches=self._local_batches,
        )
        self.in_sync = True
        if self.guard is not None and self.guard.good is None:  # replicas identical: the first good state
            self.guard.keep(self._module, self._optimizer, self._step)
        self.exchange.start()

    @property
    def asynchronous(self) -> bool:
        """Ranks train at their own pace now: a main-thread collective would make them wait for each other."""
        return self.exchange is not None and not self.in_sync

    def shutdown(self, raise_timeout: bool = True) -> None:
        """Stop every thread of the session and restore the thread settings it changed."""
        exchange, self.exchange = self.exchange, None
        if exchange is not None:  # tell the other ranks this one stops, so none of them waits for it
            exchange.abort(timeout=min(self.config.wait_timeout, _ABORT_NOTICE_SECONDS))
        self.in_sync = True
        self._drop_current()
        self.updater.close()
        torch.set_num_threads(self._saved_num_threads)
        self._restore_switch_interval()
        try:
            self.engine.stop()
        except Exception:
            if raise_timeout:
                raise
            log.warning("PD-ASGD: engine shutdown timed out", exc_info=True)

    def finish_fit(self) -> None:
        """End of fit: the last consistent point, then the exchange thread ends with every rank's agreement."""
        self.reach_consistent_point("fit_end", stop=True)
        exchange, self.exchange = self.exchange, None
        if exchange is not None:
            exchange.join(self.config.wait_timeout)

    def _restore_switch_interval(self) -> None:
        if self._saved_switch_interval is not None:
            sys.setswitchinterval(self._saved_switch_interval)
            self._saved_switch_interval = None

    # ------------------------------------------------------------------------------------------- consistent points
    def drain(self) -> None:
        """Wait until every in-flight backward has finished and applied its updates (a local consistent point)."""
        self.engine.drain()
        # ---- CUDA only (issue #13): the loop's stream sees the queued updates; non-finite values read exactly
        cuda_streams.join_update_stream(self._device)
        self._check_device_nonfinite(wait=True)

    def reach_consistent_point(self, kind: str, stop: bool = False) -> None:
        """Drain, and with several devices make every replica identical (all ranks meet here).

        A no-op across ranks when no training step ran since the last consistent point, except when the exchange
        must stop (end of fit): every rank takes the same decision, so the ranks' handshakes always match.
        """
        self.drain()
        if self.exchange is None or (self.in_sync and not stop):
            if self.exchange is None and self.guard is not None and self.guard.watch.healthy and not stop:
                self.guard.keep(self._module, self._optimizer, self._step)
            return
        self.exchange.consistent_point(kind, stop, self.engine.raise_if_failed)
        self.in_sync = True
        if self.on_consistent is not None:
            self.on_consistent(kind)
        if self.guard is None or stop or kind == "guard":
            return
        all_healthy, any_tripped = self._agree_on_guard()
        if any_tripped:
            self._recover_everywhere()
        elif all_healthy:
            self.guard.keep(self._module, self._optimizer, self._step)

    # ------------------------------------------------------------------------------------------- the step
    def before_step(self) -> str | None:
        """Before a training step's closure: let the autotuner switch configuration (a step runs wholly in one).

        Returns the autotuner's report on the step its choice is made.
        """
        tuner = self.tuner
        if tuner is None or tuner.done:
            return None
        candidate = tuner.before_step((self.stats.total_staleness_sum, self.stats.total_updates))
        if candidate is not None:
            self._apply_candidate(candidate)
        if not tuner.done:
            return None
        if self.plain_steps:  # the plain step won: nothing of the engine may cost anything from now on
            self.engine.stop()
            self._restore_switch_interval()
        return tuner.report()

    def forward(self, run: Callable[[], Any], step_args: tuple[Any, ...]) -> Any:
        """Run ``training_step`` (``run``) on a fresh stash of the weights, holding an in-flight slot.

        ``step_args`` (the batch) gives the samples counted and, on CUDA, the tensors marked as used on the batch's
        stream.
        """
        batch_size = batch_size_of(step_args)
        inputs = step_args
        self.end_step()  # a previous forward whose step never came (e.g. SWA's BatchNorm epoch): free its slot
        if self.plain_steps:
            started = perf_counter()
            output = run()
            self.stats.record_forward(perf_counter() - started, batch_size)
            return output
        if self.updater.follow_external_storage() and self.guard is not None:
            self.guard.restart()  # e.g. a lottery-ticket reset: the loss jumps back to where it started
        if self.guard is not None:
            self._guard_before_forward()
        engine = self.engine
        engine.acquire_slot()
        self.in_sync = False
        if self.exchange is not None:  # NCCL: the exchange thread resumes its collectives (exchange.py)
            self.exchange.resume()
        stash: WeightStash | None = None
        try:
            started = perf_counter()
            stash = self.updater.stash()
            stream = self._streams.next()
            stashed = perf_counter()
            with (
                cuda_streams.forward_on(stream, inputs),
                _torch_internals.reparametrized(self._module, stash.tensors),
                self.updater.reading(stash),
            ):
                output = run()
            self.stats.record_forward(perf_counter() - stashed, batch_size, stashed - started)
        except BaseException:
            if stash is not None:
                self.updater.release(stash, reusable=False)
            engine.release_slot()
            raise
        self._current = (stash, stream)
        return output

    @property
    def has_pending_forward(self) -> bool:
        """A forward ran on a stash whose loss has not been handed to the engine yet."""
        return self._current is not None and not self.plain_steps

    def hand_off(self, loss: Tensor, step: int, rank: int, closes_window: bool = True) -> None:
        """Queue the forward's loss for a backward thread (the step returns without waiting for it).

        ``closes_window``: with gradient accumulation, whether this loss is the last of its window (handed off
        inside Lightning's ``optimizer_step``)."""
        assert self._current is not None
        stash, stream = self._current
        stash.step, stash.rank = step, rank
        self._step = step
        stash.hyperparameters = hyperparameter_snapshot(self._optimizer)
        if self._pending_trip is not None:  # several devices: tripped, waiting for the consistent point
            self.end_step()
            return
        if self.guard is not None:
            trip = self.guard.observe(loss, None if loss.is_cuda else self.stats.gradient_totals())
            if trip is not None:
                self.end_step()  # this loss is not applied; its slot is free before the engine is reconfigured
                self._on_trip(trip, step)
                return
        if not self.updater.nonfinite.loss_usable(loss, step, rank):  # "skip" (raises under "error")
            self.stats.record_skipped_loss(self.updater.num_parameters)
            if closes_window:
                self.updater.close_window_without(stash)
                self.stats.record_backward(stash.record, ran_backward=False)
            return  # `end_step` releases the slot (and the weights read) of a loss that was not handed off
        self._check_device_nonfinite(wait=False)
        started = perf_counter()
        if self.updater.windows is not None:
            stash.window = self.updater.windows.join(closes_window)
        self.engine.submit(BackwardWork(loss=loss, context=(stash, stream)))
        self._current = None  # the slot now belongs to the queued work
        self.stats.record_handoff(perf_counter() - started)

    def _check_device_nonfinite(self, wait: bool) -> None:
        """CUDA only: act on the non-finite losses/gradients the device counted (``nonfinite.py``)."""
        if self.updater.nonfinite.device is not None:  # a non-finite loss shows up as its non-finite gradients
            self.stats.record_skipped_loss(self.updater.nonfinite.act_on_device(wait))

    def end_step(self) -> None:
        """After the closure: give back the slot of a forward whose loss was never handed off."""
        if self._current is not None:
            self._drop_current()
            self.engine.release_slot()

    # ------------------------------------------------------------------------------------------- the guard
    def _guard_before_forward(self) -> None:
        """One device: keep a good state every ``snapshot_every`` healthy steps (a drain: one pipeline bubble)."""
        guard = self.guard
        assert guard is not None
        if self.exchange is not None:  # several devices: good states and recoveries only at consistent points
            return
        if guard.due_for_snapshot():
            self.drain()
            guard.keep(self._module, self._optimizer, self._step)

    def _on_trip(self, trip: Trip, step: int) -> None:
        if self.exchange is not None:  # every rank decides together at the next consistent point; until then this
            self._pending_trip = trip  # rank applies no more of its own updates
            return
        self.drain()
        self._slow_down(self.guard.recover(trip, self._module, self._optimizer, step, self.max_in_flight))  # type: ignore[union-attr]

    def _recover_everywhere(self) -> None:
        """Several devices, at a consistent point where some rank had tripped: every rank meets again at a
        "guard" point that stops the exchange, restores the good state kept at an earlier consistent point
        (identical on every rank), takes the same smaller ``max_in_flight``, and the exchange restarts from it."""
        self.reach_consistent_point("guard", stop=True)
        self.exchange.join(self.config.wait_timeout)  # type: ignore[union-attr]
        self.exchange = None
        trip = self._pending_trip or Trip("another rank's loss blew up", float("nan"), float("nan"))
        self._pending_trip = None
        self._slow_down(self.guard.recover(trip, self._module, self._optimizer, self._step, self.max_in_flight))  # type: ignore[union-attr]
        self.start_exchange(self._exchange_group)

    def _slow_down(self, in_flight: int | None) -> None:
        """Fewer losses in flight from now on (drained by the caller); compensation starts over. ``None``: the
        blow-up happened with one loss in flight, plain Lightning's own updates: the guard stops watching."""
        self.stats.guard_trips += 1
        if in_flight is None:  # nothing was restored
            self.guard = None
            return
        if self.updater.windows is not None:  # gradients summed before the restore do not belong to its weights
            self.updater.windows.discard()
        self._compensation.reset()
        threads = min(self.backward_threads, in_flight)
        intra_op = self._intra_op_threads(threads, in_flight, None)
        torch.set_num_threads(intra_op)
        self.engine.reconfigure(threads, in_flight, partial(torch.set_num_threads, intra_op))
        self.backward_threads, self.max_in_flight, self.intra_op_threads = threads, in_flight, intra_op
        self._streams = cuda_streams.StreamPool(self._device, in_flight)

    def _agree_on_guard(self) -> tuple[bool, bool]:
        """At a consistent point (ranks synchronous): whether every rank's loss is healthy (all keep the same good
        state, or none does) and whether any rank tripped (all recover, or none does). One all-reduce."""
        guard = self.guard
        assert guard is not None
        device = self._device if torch.distributed.get_backend() == "nccl" else torch.device("cpu")
        flags = torch.tensor([float(not guard.watch.healthy), float(self._pending_trip is not None)], device=device)
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        unhealthy, tripped = flags.tolist()
        return unhealthy == 0, tripped > 0

    def _drop_current(self) -> None:
        """Forget a forward whose loss was never handed off: its graph may live on (the user may hold the output),
        so the weights it read are never written in place again."""
        current, self._current = self._current, None
        if current is not None:
            self.updater.release(current[0], reusable=False)

    def _run_backward(self, work: BackwardWork) -> None:
        """Runs on a backward thread: the backward pass, whose hooks apply the updates bucket by bucket."""
        stash, stream = work.context
        updater = self.updater
        started = perf_counter()
        with cuda_streams.backward_on(stream):
            try:
                torch.autograd.backward(work.loss, inputs=stash.leaves)
            except RuntimeError as error:
                add_unread_note(error, stash)
                raise
            updater.finish(stash)
            cuda_streams.finish(stream)
        stash.record.seconds = perf_counter() - started
        self.stats.record_backward(stash.record)
        work.loss = None  # type: ignore[assignment]  # free the graph before the leaves are reused
        updater.release(stash, reusable=True)

    def log_metrics(self, module: Any) -> None:
        """Log the engine's statistics through ``module`` when Lightning writes logs (``metrics.log_window``)."""
        log_window(self, module)

    # ------------------------------------------------------------------------------------------- autotuning
    def _apply_candidate(self, candidate: Candidate) -> None:
        """Switch thread counts between two steps: drained, so no update is lost or reordered."""
        self.engine.drain()
        cuda_streams.join_update_stream(self._device)  # CUDA only: a plain step's optimizer runs on the loop's stream
        self.plain_steps = candidate.synchronous
        if candidate.synchronous:  # the plain step: one thread with every core, as plain Lightning
            torch.set_num_threads(candidate.intra_op_threads or self._saved_num_threads)
            return
        threads = candidate.backward_threads
        in_flight = self.config.max_in_flight or threads
        intra_op = self._intra_op_threads(threads, in_flight, candidate.intra_op_threads)
        torch.set_num_threads(intra_op)
        if (threads, in_flight, intra_op) != (self.backward_threads, self.max_in_flight, self.intra_op_threads):
            self.engine.reconfigure(threads, in_flight, partial(torch.set_num_threads, intra_op))
            self.backward_threads, self.max_in_flight, self.intra_op_threads = threads, in_flight, intra_op
            self._streams = cuda_streams.StreamPool(self._device, in_flight)
