"""One fit's engine: everything that exists only while ``trainer.fit`` trains, created and shut down together.

The session owns the engine's threads (``thread_control.py``), the layer-wise updater, the statistics, the divergence
guard and, with several devices, the exchange it connects through the ``PeerLink`` it is handed (``peers.py``);
``shutdown`` gives everything back. Its state is read through properties and changed only by its own methods.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from functools import partial
from time import perf_counter
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_pdasgd.engine import cuda_streams
from lightning_pdasgd.engine.backward_threads import BackwardWork
from lightning_pdasgd.engine.bucket_optimizer import hyperparameter_snapshot
from lightning_pdasgd.engine.compensation import resolve as resolve_compensation
from lightning_pdasgd.engine.completion import CompletionFrontier
from lightning_pdasgd.engine.cuda_streams import BatchStream
from lightning_pdasgd.engine.divergence_guard import DivergenceGuard, Trip
from lightning_pdasgd.engine.guard_recovery import GuardRecovery
from lightning_pdasgd.engine.layerwise_updates import LayerwiseUpdater
from lightning_pdasgd.engine.lazy_reads import add_unread_note
from lightning_pdasgd.engine.metrics import EngineStats, batch_size_of, describe_session
from lightning_pdasgd.engine.nonfinite import host_loss_value
from lightning_pdasgd.engine.parameter_changes import ParameterSetFingerprint
from lightning_pdasgd.engine.peers import Exchange, PeerLink, Replicas
from lightning_pdasgd.engine.thread_control import EngineThreads
from lightning_pdasgd.engine.weight_stash import WeightStash

if TYPE_CHECKING:
    from lightning_pdasgd.config import PDASGDConfig

log = logging.getLogger(__name__)

_ABORT_NOTICE_SECONDS = 30.0  # how long a failing rank tries to tell the others before it exits anyway

StashAndStream = tuple[WeightStash, Optional[BatchStream]]  # a forward's weights, its CUDA stream (None: CPU)


class FitSession(GuardRecovery):
    """The engine of one fit on one rank.

    Args:
        config: the strategy's validated settings.
        module: the LightningModule being trained.
        optimizer: the user's (only) optimizer.
        device: this rank's device.
        clip_value: ``gradient_clip_val`` with the ``"value"`` algorithm, applied per parameter.
        clip_norm: ``gradient_clip_val`` with the ``"norm"`` algorithm: per bucket, or per backward at one in flight.
        accumulate: the fit accumulates gradients (``accumulation.py``).
        synchronous_reason: why this fit runs Lightning's own step whatever the settings (``None``: they decide).
    """

    def __init__(
        self, config: PDASGDConfig, module: nn.Module, optimizer: Optimizer, device: torch.device,
        clip_value: float | None = None, clip_norm: float | None = None,
        accumulate: bool = False,
        synchronous_reason: str | None = None,
    ) -> None:
        self._config = config
        self.synchronous_reason = synchronous_reason  # why Lightning's own step runs whatever the settings
        self._module = module
        self._optimizer = optimizer
        self._device = device
        self._stats = EngineStats()
        self._compensation = resolve_compensation(config.staleness_compensation)  # fresh state for each fit
        self._new_updater = partial(
            LayerwiseUpdater,
            layerwise=config.layerwise,
            clip_value=clip_value,
            clip_norm=clip_norm,
            accumulate=accumulate,
            log_grad_norm=config.log_grad_norm,
            nonfinite=config.nonfinite,
            grad_norms=config.divergence_guard,
            bucket_numel=config.bucket_numel,
            compensation=self._compensation,
            lazy_reads=config.lazy_reads,
            wait_timeout=config.wait_timeout,
            one_loss_in_flight=lambda: self._engine.max_in_flight <= 1,
        )
        self._updater = self._build_updater(optimizer)
        self._threads = EngineThreads(
            self._run_backward,
            config.backward_threads_on(device),
            config.in_flight,
            config.intra_op_threads,
            config.wait_timeout,
            device,
        )
        self._engine = self._threads.engine
        self._replicas: Replicas | None = None  # several devices
        self._current: StashAndStream | None = None  # the forward whose loss is not handed off yet
        self.completion = CompletionFrontier()  # which batches have applied every update (fault tolerance)
        self._plain_batch: int | None = None  # Lightning's own step: the batch whose step may still run
        # the guard watches asynchrony: a run configured with one loss in flight is exactly plain Lightning's
        asynchronous = config.in_flight > 1 and synchronous_reason is None
        self._guard = DivergenceGuard() if config.divergence_guard and asynchronous else None
        self._pending_trip: Trip | None = None  # several devices: this rank's trip, acted on at the guard point
        self._step = 0  # the global step of the latest hand-off (for the guard's messages and snapshots)

    @property
    def config(self) -> PDASGDConfig:
        return self._config

    @property
    def stats(self) -> EngineStats:
        return self._stats

    @property
    def updater(self) -> LayerwiseUpdater:
        return self._updater

    @property
    def threads(self) -> EngineThreads:
        """The thread counts in force, the autotuner, and whether the plain synchronous step runs."""
        return self._threads

    @property
    def exchange(self) -> Exchange | None:
        return self._replicas.exchange if self._replicas is not None else None

    @property
    def asynchronous(self) -> bool:
        """Ranks train at their own pace now: a main-thread collective would make them wait for each other."""
        return self._replicas is not None and self._replicas.asynchronous

    @property
    def lightning_steps_only(self) -> bool:
        """One device runs Lightning's own step for good: the strategy's hooks pass straight on to Lightning's."""
        return self._threads.plain_steps_for_good and self._replicas is None

    @property
    def lightning_step_alone(self) -> bool:
        """One device runs Lightning's own step now (for good, or for a warm-up or an autotuner trial)."""
        return self._threads.plain_steps and self._replicas is None

    @property
    def has_pending_forward(self) -> bool:
        """A forward ran on a stash whose loss has not been handed to the engine yet."""
        return self._current is not None and not self._threads.plain_steps

    # ------------------------------------------------------------------------------------------- lifecycle
    def start_for(self, world_size: int, run_steps: float, warmup: tuple[int, int] = (0, 0)) -> str:
        """Start the engine (autotuning when a thread count is "auto"; one loss in flight for the ``warmup`` steps:
        ``config.warmup_steps``); returns the line to log at INFO."""
        config = self._config
        short = not self._threads.start(
            config.autotune and self.synchronous_reason is None, config.autotune_steps, config.autotune_max_staleness,
            world_size == 1, run_steps, self.synchronous_reason is not None, *warmup,
        )
        return ("PD-ASGD: the run is too short for autotuning; keeping the configured thread counts.\n"
                if short else "") + describe_session(self, world_size)

    def _build_updater(
        self, optimizer: Optimizer, detached: frozenset[int] = frozenset(), shared: frozenset[int] = frozenset()
    ) -> LayerwiseUpdater:
        updater = self._new_updater(self._module, optimizer, detached=detached, shared=shared)
        self._fingerprint = ParameterSetFingerprint(self._module, optimizer, updater.buckets)
        return updater

    def follow_parameter_changes(self, optimizers: list[Optimizer], recheck: Callable[[], None]) -> None:
        """Fine-tuning, pruning, ``requires_grad`` toggles, a re-created optimizer: rebuild before this forward,
        after ``recheck`` (the setup checks) on the optimizer. One device's plain step reads the set as it is."""
        if self._threads.plain_steps and self._replicas is None:
            return
        with self._updater.reads.recomputation.places_held():  # no module recomputed by a backward meanwhile
            change = self._fingerprint.difference(optimizers[0]) if len(optimizers) == 1 else "the optimizers changed"
        if change is None:
            return
        recheck()
        log.debug("PD-ASGD: %s; rebuilding the engine's buckets", change)
        self._rebuild(optimizers[0])

    def _rebuild(self, optimizer: Optimizer) -> None:
        """Follow a changed parameter set: drain, rebuild buckets, stashes and per-bucket optimizers.

        Optimizer state lives in the user's optimizer, keyed by parameter, so it carries over. With several
        devices every rank must make the same change (callbacks and hooks run on every rank): the ranks meet at a
        consistent point, the exchange stops, and a new one starts over the new buckets.
        """
        exchanging = self.exchange is not None
        if exchanging:
            self._stop_exchange("rebuild")
        self.drain()
        self._optimizer = optimizer
        self._updater.close()
        self._compensation.reset()  # its running state is per bucket, and the buckets are about to change
        trained_before = frozenset(id(param) for bucket in self._updater.buckets for param in bucket.params)
        shared = self._updater.storage_given_from_outside()
        self._updater = self._build_updater(optimizer, detached=trained_before, shared=shared)
        if self._guard is not None:  # the good state holds the old parameter set
            self._guard.restart()
        if exchanging:
            self._connect_exchange()

    def join_peers(self, link: PeerLink, on_consistent: Callable[[str], None] | None = None) -> None:
        """Several devices: make the replicas identical, then exchange updates in the background; ``on_consistent``
        runs after every consistent point the ranks met at, with its kind (the step count over ranks settles)."""
        self._replicas = Replicas(link, on_consistent, self._config.wait_timeout)
        if self._guard is not None:
            self._guard.exchanging_replicas()
        self._connect_exchange()

    def _connect_exchange(self) -> None:
        assert self._replicas is not None
        self._replicas.connect(self._updater.buckets, self._module, self._optimizer, self._engine.fail)
        if self._guard is not None and self._guard.good is None:  # replicas identical: the first good state
            self._guard.keep(self._module, self._optimizer, self._step)
        self.exchange.start()  # type: ignore[union-attr]

    def _stop_exchange(self, kind: str) -> None:
        """Every rank meets at a consistent point of ``kind`` that ends the exchange thread."""
        self.reach_consistent_point(kind, stop=True)
        if self._replicas is not None:
            self._replicas.join()

    def shutdown(self, raise_timeout: bool = True) -> None:
        """Stop every thread of the session and restore the thread settings it changed."""
        if self._replicas is not None:  # tell the other ranks this one stops, so none of them waits for it
            self._replicas.abort(timeout=min(self._config.wait_timeout, _ABORT_NOTICE_SECONDS))
        self._drop_current()
        self._updater.close()
        try:
            self._threads.shutdown()
        except Exception:
            if raise_timeout:
                raise
            log.warning("PD-ASGD: engine shutdown timed out", exc_info=True)

    def finish_fit(self) -> None:
        """End of fit: the last consistent point, then the exchange thread ends with every rank's agreement."""
        self._stop_exchange("fit_end")

    # ------------------------------------------------------------------------------------------- consistent points
    def drain(self) -> None:
        """Wait until every in-flight backward has finished and applied its updates (a local consistent point)."""
        with self._updater.reads.recomputation.modes_of_the_last_forward():
            self._engine.drain()
        self._finish_plain_batch()
        cuda_streams.join_update_stream(self._device)  # CUDA (issue #13): the loop's stream sees the queued updates
        self._check_device_nonfinite(wait=True)  # ... and non-finite values are read exactly

    def reach_consistent_point(self, kind: str, stop: bool = False) -> None:
        """Drain, and with several devices make every replica identical (all ranks meet here; ``Replicas.meet``
        says when they need not)."""
        self.drain()
        met = self._replicas is not None and self._replicas.meet(kind, stop, self._engine.raise_if_failed)
        self._guard_at_consistent_point(met, kind, stop)

    # ------------------------------------------------------------------------------------------- the step
    def before_step(self) -> str | None:
        """Before a step's closure: the warm-up may end, the autotuner may switch (its report when it chooses)."""
        was_plain = self._threads.plain_steps
        report = self._threads.before_step(
            (self._stats.total_staleness_sum, self._stats.total_updates), self._config.max_in_flight
        )
        if was_plain and not self._threads.plain_steps:
            self._finish_plain_batch()  # the last plain step has run: its batch applied every update
        return report

    def forward(self, run: Callable[[], Any], step_args: tuple[Any, ...]) -> Any:
        """Run ``training_step`` (``run``) on a fresh stash of the weights, holding an in-flight slot; ``step_args``
        (the batch) gives the samples counted and, on CUDA, the tensors used on the batch's stream."""
        batch_size = batch_size_of(step_args)
        self.end_step()  # a previous forward whose step never came (e.g. SWA's BatchNorm epoch): free its slot
        if self._threads.plain_steps:
            self._updater.reads.close()  # Lightning's own step: nothing of the engine on the modules' call path
            self._finish_plain_batch()  # its step (if any) ran before this forward
            self._plain_batch = self.completion.begin()
            if self._replicas is not None:
                self._replicas.training()
            started = perf_counter()
            with self.plain_step():
                output = run()
            self._stats.record_forward(perf_counter() - started, batch_size)
            return output
        self._updater.reads.attach()  # after plain steps (an autotune trial) the pre-hooks come back
        if self._updater.follow_external_storage() and self._guard is not None:
            self._guard.restart()  # e.g. a lottery-ticket reset: the loss jumps back to where it started
        if self._guard is not None and self.exchange is None and self._guard.due_for_snapshot():
            self.drain()  # one device: a good state every `snapshot_every` healthy steps (one pipeline bubble)
            self._guard.keep(self._module, self._optimizer, self._step)
        self._engine.acquire_slot()
        if self._replicas is not None:
            self._replicas.training()
        stash: WeightStash | None = None
        try:
            started = perf_counter()
            stash = self._updater.stash()
            stash.number = self.completion.begin()
            stream = self._threads.streams.next()
            stashed = perf_counter()
            with (
                cuda_streams.forward_on(stream, step_args),
                self._updater.reading(stash),  # holds the modules' parameter places: swap inside
                stash.buffers.swapped_into(self._module),
            ):
                output = run()
            self._stats.record_forward(perf_counter() - stashed, batch_size, stashed - started)
        except BaseException:
            if stash is not None:
                self.completion.finish(stash.number)
                self._updater.release(stash, reusable=False)
            self._engine.release_slot()
            raise
        self._current = (stash, stream)
        return output

    def _finish_plain_batch(self) -> None:
        """Lightning's own step: the last forward's step has run (called before the next forward and at drains)."""
        number, self._plain_batch = self._plain_batch, None
        self.completion.finish(number)

    def plain_step(self) -> AbstractContextManager[None]:
        """Around Lightning's own step (its optimizer step, and ``training_step``, where manual optimization steps):
        with several devices the exchange merges between steps only. Re-entrant: a closure runs inside its step."""
        if self._replicas is None:
            return nullcontext()
        if not self._updater.plain_step_held:  # the exchange merges into the parameters' storage: follow it
            self._updater.follow_external_storage()
        return self._updater.held_for_plain_step()

    def hand_off(self, loss: Tensor, step: int, rank: int, closes_window: bool = True) -> None:
        """Queue the forward's loss for a backward thread (the step returns without waiting for it); with gradient
        accumulation ``closes_window`` says whether it is its window's last (handed off in ``optimizer_step``)."""
        assert self._current is not None
        stash, stream = self._current
        stash.step, stash.rank = step, rank
        self._step = step
        stash.hyperparameters = hyperparameter_snapshot(self._optimizer)
        self._threads.observe_warmup_loss(loss)
        if self._pending_trip is not None:  # several devices: tripped, waiting for the consistent point
            self.end_step()
            return
        value = host_loss_value(loss) if self._guard is not None or self._updater.nonfinite.checks else None
        if self._guard is not None:
            trip = self._guard.observe(loss, None if loss.is_cuda else self._stats.gradient_totals(), value, step)
            if trip is not None:
                self.end_step()  # this loss is not applied; its slot is free before the engine is reconfigured
                self._on_trip(trip, step)
                return
        if not self._updater.nonfinite.loss_usable(loss, step, rank, value):  # "skip" (raises under "error")
            self._stats.record_skipped_loss(self._updater.num_parameters)
            if closes_window:
                self._updater.close_window_without(stash)
                self._stats.record_backward(stash.record, ran_backward=False)
            return  # `end_step` releases the slot (and the weights read) of a loss that was not handed off
        self._check_device_nonfinite(wait=False)
        started = perf_counter()
        if self._updater.windows is not None:
            stash.window = self._updater.windows.join(closes_window)
        self._engine.submit(BackwardWork(loss=loss, context=(stash, stream)))
        self._current = None  # the slot now belongs to the queued work
        self._stats.record_handoff(perf_counter() - started)

    def _check_device_nonfinite(self, wait: bool) -> None:
        """CUDA only: act on the non-finite values the device counted (a loss shows up as its gradients)."""
        if self._updater.nonfinite.device is not None:
            self._stats.record_skipped_loss(self._updater.nonfinite.act_on_device(wait))

    def end_step(self) -> None:
        """After the closure: give back the slot of a forward whose loss was never handed off."""
        if self._current is not None:
            self._drop_current()
            self._engine.release_slot()

    def _drop_current(self) -> None:
        """Forget a forward whose loss was never handed off: its graph may live on, so its weights stay as read."""
        current, self._current = self._current, None
        if current is not None:
            self.completion.finish(current[0].number)  # its loss was never handed off: no update will come
            self._updater.release(current[0], reusable=False)

    def _run_backward(self, work: BackwardWork[StashAndStream]) -> None:
        """Runs on a backward thread: the backward pass, whose hooks apply the updates bucket by bucket."""
        stash, stream = work.context
        updater = self._updater
        started = perf_counter()
        with cuda_streams.backward_on(stream), updater.reads.recomputation.backward_of(stash):
            try:
                work.loss.backward()  # as Lightning calls it: a checkpointed segment (no leaf of ours) runs too
            except RuntimeError as error:
                add_unread_note(error, stash)
                raise
            updater.finish(stash)
            cuda_streams.finish(stream)
        stash.record.seconds = perf_counter() - started
        self._stats.record_backward(stash.record)
        self.completion.finish(stash.number)
        work.loss = None  # type: ignore[assignment]  # free the graph before the leaves are reused
        updater.release(stash, reusable=True)
