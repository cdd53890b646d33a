"""The Lightning-facing strategy: ``Trainer(strategy="pdasgd")``.

It replaces exactly the synchronous step of automatic optimization (forward, backward, ``optimizer.step()``) and
keeps Lightning's fit and epoch loops, so step counting, validation triggers, callbacks, LR schedulers, loggers and
checkpoint keys stay those of a plain run. Lightning's loop thread is the forward thread: ``training_step`` runs
there on a private copy of the weights, ``backward`` hands the loss to the engine instead of running it, and
``optimizer_step`` runs the closure without stepping the optimizer. The backward threads apply the updates.
See ``DESIGN.md`` beside this file for the reasons.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any, Literal, Optional, Union

import torch
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.utilities.distributed import _distributed_is_initialized
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.accelerators import Accelerator
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import ParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.data import extract_batch_size
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from lightning_pdasgd import _internals, checks, streams
from lightning_pdasgd.autotune import Candidate, ThreadAutotuner, default_candidates
from lightning_pdasgd.callbacks import EngineDrain
from lightning_pdasgd.claiming import claiming_dataloader
from lightning_pdasgd.engine import BackwardEngine, BackwardWork
from lightning_pdasgd.exchange import ReplicaExchange
from lightning_pdasgd.metrics import (
    BACKWARD_THREADS,
    SAMPLES_PER_SECOND,
    STALENESS_MEAN,
    WALL_TIME,
    EngineStats,
)
from lightning_pdasgd.updates import (
    NONFINITE_POLICIES,
    LayerwiseUpdater,
    NonFiniteError,
    WeightStash,
    hyperparameter_snapshot,
)

log = logging.getLogger(__name__)

_ABORT_NOTICE_SECONDS = 30.0
_SWITCH_INTERVAL_S = 0.001  # how long a failing rank tries to tell the others before it exits anyway


class PDASGDStrategy(ParallelStrategy):
    """Partial Decoupled Asynchronous SGD (arXiv 2410.05985) for any LightningModule with automatic optimization.

    Args:
        forward_threads: threads that run ``training_step``. Lightning's loop thread is the forward thread; only
            ``1`` (or ``"auto"``, which resolves to 1) is supported in this release.
        backward_threads: threads that run backward passes concurrently and apply the updates. ``"auto"`` times
            candidate configurations on the first training steps (1 to 3 backward threads, one or all intra-op
            threads on CPU, and the plain synchronous step) and keeps the fastest one whose mean staleness is at
            most ``autotune_max_staleness``; see ``autotune.py``.
        max_in_flight: most losses whose backward has not finished (live graphs); defaults to
            ``backward_threads``. ``1`` makes every forward wait for the previous backward: exactly the plain
            synchronous result, a useful check.
        layerwise: apply each parameter's update the moment its gradient is ready (PD-ASGD). ``False`` is the
            D-ASGD ablation: one whole-model update at the end of each backward.
        wait_timeout: seconds any wait of the engine (a free in-flight slot, a drain, thread shutdown) may take
            before it fails with an error that names it.
        intra_op_threads: ``torch.set_num_threads`` while fitting; ``None`` leaves torch's setting alone.
        log_grad_norm: also log ``pdasgd/grad_norm``, the mean L2 norm of each backward's full gradient, which
            replaces gradient-norm logging from ``on_before_optimizer_step``.
        exchange_interval: with several devices, least seconds between the starts of two rounds of the replica
            exchange. ``0`` runs rounds back to back, so one rank's updates reach the others within about two
            rounds; raise it when a round's copy and all-reduce compete with compute for the same cores.
        nonfinite: what a NaN/Inf loss or gradient does: ``"error"`` stops training with an error naming the step,
            the parameter and the rank; ``"skip"`` drops that update and counts it in ``pdasgd/skipped_updates``;
            ``"off"`` checks nothing (saves one reduction per parameter and backward).
        checkpoint_on_preemption: on SIGTERM (or Ctrl-C), drain, reach a consistent point and save
            ``hpc_ckpt_<n>.ckpt`` in ``default_root_dir`` through ``trainer.save_checkpoint`` before exiting;
            ``trainer.fit(..., ckpt_path="hpc")`` resumes from it (automatically under SLURM).
        autotune_steps: training steps timed per candidate when a thread count is ``"auto"``.
        autotune_max_staleness: the bound on mean staleness a candidate must respect to be chosen.
    """

    strategy_name = "pdasgd"

    def __init__(
        self,
        forward_threads: Union[int, Literal["auto"]] = 1,
        backward_threads: Union[int, Literal["auto"]] = 2,
        max_in_flight: Optional[int] = None,
        layerwise: bool = True,
        wait_timeout: float = 600.0,
        intra_op_threads: Optional[int] = None,
        log_grad_norm: bool = False,
        exchange_interval: float = 0.0,
        nonfinite: str = "error",
        checkpoint_on_preemption: bool = True,
        autotune_steps: int = 6,
        autotune_max_staleness: float = 4.0,
        accelerator: Optional[Accelerator] = None,
        parallel_devices: Optional[list[torch.device]] = None,
        cluster_environment: Optional[ClusterEnvironment] = None,
        checkpoint_io: Optional[CheckpointIO] = None,
        precision_plugin: Optional[Precision] = None,
        process_group_backend: Optional[str] = None,
        timeout: Optional[timedelta] = default_pg_timeout,
    ) -> None:
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
        )
        self._autotune = backward_threads == "auto" or forward_threads == "auto"
        forward_threads = 1 if forward_threads == "auto" else forward_threads
        backward_threads = 2 if backward_threads == "auto" else backward_threads
        checks.check_positive_int("forward_threads", forward_threads)
        checks.check_positive_int("backward_threads", backward_threads)
        checks.check_positive_int("autotune_steps", autotune_steps)
        if not autotune_max_staleness >= 0:
            raise ValueError(
                f"PDASGDStrategy: `autotune_max_staleness` must be >= 0, got {autotune_max_staleness!r}."
            )
        checks.check_positive_int("max_in_flight", max_in_flight, allow_none=True)
        checks.check_positive_int("intra_op_threads", intra_op_threads, allow_none=True)
        if forward_threads != 1:
            raise ValueError(
                f"PDASGDStrategy: `forward_threads={forward_threads}` is not supported yet: Lightning's loop thread"
                " runs every forward. Use `forward_threads=1` and raise `backward_threads` for more concurrency."
            )
        if not wait_timeout > 0:
            raise ValueError(f"PDASGDStrategy: `wait_timeout` must be > 0 seconds, got {wait_timeout!r}.")
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"PDASGDStrategy: `nonfinite` must be one of {NONFINITE_POLICIES}, got {nonfinite!r}.")
        if not exchange_interval >= 0:
            raise ValueError(f"PDASGDStrategy: `exchange_interval` must be >= 0 seconds, got {exchange_interval!r}.")
        self._forward_threads = forward_threads
        self._backward_threads = backward_threads
        self._max_in_flight_arg = max_in_flight
        self._max_in_flight = max_in_flight if max_in_flight is not None else backward_threads
        self._autotune_steps = autotune_steps
        self._autotune_max_staleness = float(autotune_max_staleness)
        self._tuner: Optional[ThreadAutotuner] = None
        self._plain_steps = False  # the autotuner chose (or is timing) the plain synchronous step
        self.autotune_report: Optional[str] = None
        self._layerwise = layerwise
        self._wait_timeout = float(wait_timeout)
        self._intra_op_threads = intra_op_threads
        self._log_grad_norm = log_grad_norm
        self._exchange_interval = float(exchange_interval)
        self._nonfinite = nonfinite
        self._checkpoint_on_preemption = checkpoint_on_preemption
        self._num_nodes = 1
        self._process_group_backend = process_group_backend
        self._timeout = timeout
        # created when fitting starts, so the strategy stays picklable and reusable across fits
        self._engine: Optional[BackwardEngine] = None
        self._updater: Optional[LayerwiseUpdater] = None
        self._streams: Optional[streams.StreamPool] = None
        self._stats = EngineStats()
        self._current: Optional[tuple[WeightStash, Any]] = None  # the forward whose loss is not handed off yet
        self._saved_num_threads: Optional[int] = None
        self._saved_switch_interval: Optional[float] = None
        self._fit_started_at = time.perf_counter()
        # several devices: the exchange's process group, the running exchange, and whether the replicas are
        # identical now (a consistent point passed and no training step ran since)
        self._exchange_group: Any = None
        self._exchange: Optional[ReplicaExchange] = None
        self._in_sync = True
        self._claim_key: Optional[tuple[int, str]] = None  # (seed, store key prefix), agreed by all ranks

    # ------------------------------------------------------------------------------------------- properties
    @property
    def backward_threads(self) -> int:
        return self._backward_threads

    @property
    def forward_threads(self) -> int:
        return self._forward_threads

    @property
    def max_in_flight(self) -> int:
        return self._max_in_flight

    @property
    def layerwise(self) -> bool:
        return self._layerwise

    @property
    def stats(self) -> EngineStats:
        return self._stats

    @property
    def engine(self) -> Optional[BackwardEngine]:
        return self._engine

    @property
    def updater(self) -> Optional[LayerwiseUpdater]:
        return self._updater

    @property
    @override
    def root_device(self) -> torch.device:
        assert self.parallel_devices is not None
        return self.parallel_devices[self.local_rank]

    @property
    def num_nodes(self) -> int:
        return self._num_nodes

    @num_nodes.setter
    def num_nodes(self, num_nodes: int) -> None:
        self._num_nodes = num_nodes

    @property
    def num_processes(self) -> int:
        return len(self.parallel_devices) if self.parallel_devices is not None else 0

    @property
    def is_distributed(self) -> bool:
        return self.num_nodes * self.num_processes > 1

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        return {"num_replicas": self.num_nodes * self.num_processes, "rank": self.global_rank}

    # ------------------------------------------------------------------------------------------- processes
    @override
    def _configure_launcher(self) -> None:
        assert self.cluster_environment is not None
        if self.num_nodes * self.num_processes > 1:
            self._launcher = _internals.subprocess_script_launcher(
                self.cluster_environment, self.num_processes, self.num_nodes
            )  # type: ignore[assignment]

    @override
    def setup_environment(self) -> None:
        super().setup_environment()
        self.set_world_ranks()
        if self.world_size > 1:
            backend = self._process_group_backend or _internals.default_process_group_backend(self.root_device)
            self._process_group_backend = backend
            device = self.root_device if self.root_device.type != "cpu" else None
            _internals.init_process_group(self.cluster_environment, backend, self._timeout, device)
            # the exchange thread's own group: Lightning's barriers and `sync_dist` keep the default one
            self._exchange_group = torch.distributed.new_group(
                backend=backend, timeout=timedelta(seconds=self._wait_timeout)
            )

    def set_world_ranks(self) -> None:
        if self.cluster_environment is not None:
            self.cluster_environment.set_global_rank(self.node_rank * self.num_processes + self.local_rank)
            self.cluster_environment.set_world_size(self.num_nodes * self.num_processes)

    @override
    def model_to_device(self) -> None:
        assert self.model is not None
        self.model.to(self.root_device)

    @property
    def _asynchronous(self) -> bool:
        """Ranks train at their own pace now: a main-thread collective would make them wait for each other."""
        return self._exchange is not None and not self._in_sync

    @override
    def barrier(self, *args: Any, **kwargs: Any) -> None:
        if _distributed_is_initialized() and not self._asynchronous:
            torch.distributed.barrier()

    @override
    def broadcast(self, obj: Any, src: int = 0) -> Any:
        if not _distributed_is_initialized() or self._asynchronous:
            return obj
        container = [obj]
        torch.distributed.broadcast_object_list(container, src)
        return container[0]

    @override
    def reduce(self, tensor: Any, group: Optional[Any] = None, reduce_op: Optional[Union[str, Any]] = "mean") -> Any:
        if isinstance(tensor, Tensor) and not self._asynchronous:
            return _internals.sync_ddp_if_available(tensor, group, reduce_op=reduce_op)
        return tensor

    @override
    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        if self._asynchronous:
            return decision
        return super().reduce_boolean_decision(decision, all=all)

    @override
    def all_gather(self, tensor: Tensor, group: Optional[Any] = None, sync_grads: bool = False) -> Tensor:
        if self._asynchronous:
            return tensor.unsqueeze(0)
        return super().all_gather(tensor, group=group, sync_grads=sync_grads)

    @override
    def process_dataloader(self, dataloader: object) -> object:
        """With several devices, share the training epoch dynamically (see ``claiming.py``)."""
        module = self.lightning_module
        if self.world_size <= 1 or module is None or module._trainer is None or not module.trainer.training:
            return dataloader
        if not isinstance(dataloader, torch.utils.data.DataLoader) or self._claim_key is None:
            return dataloader
        seed, prefix = self._claim_key
        claiming = claiming_dataloader(dataloader, seed, _internals.default_store(), prefix, self.world_size)
        if claiming is None:
            rank_zero_warn(
                "PD-ASGD: the training dataloader (an iterable dataset or a custom batch sampler) cannot be shared"
                " dynamically between ranks, so each rank iterates its own shard and a slow rank delays the end of"
                " every epoch. Use a map-style dataset with a standard batch sampler for straggler-proof epochs."
            )
            return dataloader
        return claiming

    # ------------------------------------------------------------------------------------------- setup
    @override
    def setup(self, trainer: Trainer) -> None:
        assert self.accelerator is not None
        self.accelerator.setup(trainer)
        assert self.model is not None
        self.model = self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        fitting = trainer.state.fn == TrainerFn.FITTING
        if fitting:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        if fitting:
            _internals.optimizers_to_device(self.optimizers, self.root_device)
            self._check_fit_configuration(trainer)
            if not any(isinstance(callback, EngineDrain) for callback in trainer.callbacks):
                trainer.callbacks.insert(0, EngineDrain())
            if self.world_size > 1:
                # rank 0's torch seed orders the shared permutations (reproducible under `seed_everything`,
                # and no random number is drawn from the user's generator); the nonce keeps runs' keys apart
                seed = torch.initial_seed() % (2**31 - 1)
                nonce = f"pdasgd/claims/{time.time_ns()}-{os.getpid()}"
                self._claim_key = self.broadcast((seed, nonce))

    def _check_fit_configuration(self, trainer: Trainer) -> None:
        if self.world_size > 1:
            checks.check_multi_device_settings(trainer)
        module = self.lightning_module
        assert module is not None
        checks.check_trainer_settings(trainer, module, self.optimizers)
        checks.warn_gradient_hooks(module, trainer.callbacks)

    # ------------------------------------------------------------------------------------------- engine lifecycle
    @override
    def on_train_start(self) -> None:
        super().on_train_start()
        module = self.lightning_module
        assert module is not None
        trainer = module.trainer
        clip = trainer.gradient_clip_val if trainer.gradient_clip_val else None
        self._updater = LayerwiseUpdater(
            module,
            self.optimizers[0],
            layerwise=self._layerwise,
            clip_value=float(clip) if clip is not None else None,
            log_grad_norm=self._log_grad_norm,
            nonfinite=self._nonfinite,
        )
        self._streams = streams.StreamPool(self.root_device, self._max_in_flight)
        self._stats = EngineStats()
        self._fit_started_at = time.perf_counter()
        self._saved_num_threads = torch.get_num_threads()
        self._saved_switch_interval = sys.getswitchinterval()
        # backward threads need the GIL for every update; Python's default 5 ms switch interval would make each
        # one wait behind the loop thread's Python work
        sys.setswitchinterval(min(self._saved_switch_interval, _SWITCH_INTERVAL_S))
        if self._intra_op_threads is not None:
            torch.set_num_threads(self._intra_op_threads)
        self._engine = BackwardEngine(
            self._run_backward,
            backward_threads=self._backward_threads,
            max_in_flight=self._max_in_flight,
            wait_timeout=self._wait_timeout,
        )
        self._engine.start()
        if self.world_size > 1:
            self._start_exchange(module)
        self._plain_steps = False
        if self._autotune:
            candidates = default_candidates(self.root_device, allow_synchronous=self.world_size == 1)
            self._tuner = ThreadAutotuner(candidates, self._autotune_steps, self._autotune_max_staleness)
        log.debug(
            "%s: engine started (%d backward threads, max_in_flight=%d, layerwise=%s)",
            type(self).__name__,
            self._backward_threads,
            self._max_in_flight,
            self._layerwise,
        )

    def _start_exchange(self, module: LightningModule) -> None:
        assert self._updater is not None and self._engine is not None
        for tensor in [*module.parameters(), *module.buffers()]:  # replicas start identical (as DDP does)
            torch.distributed.broadcast(tensor.data, src=0)
        self._exchange = ReplicaExchange(
            self._updater.slots,
            module,
            self.optimizers[0],
            group=self._exchange_group,
            interval_s=self._exchange_interval,
            timeout_s=self._wait_timeout,
            on_error=self._engine.fail,
        )
        self._in_sync = True
        _internals.replace_sigterm_broadcast(module.trainer, self._check_sigterm)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._on_sigterm)
        self._exchange.start()

    def _check_sigterm(self) -> None:
        """Lightning's per-batch SIGTERM check, carried by the exchange thread instead of a collective.

        When any rank got SIGTERM, every rank drains, the replicas are merged at a consistent point (so no
        rank's in-flight updates are lost) and Lightning's ``SIGTERMException`` takes its usual exit path, on
        which ``on_exception`` writes the preemption checkpoint.
        """
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        exchange = self._exchange
        if exchange is None or not exchange.sigterm_seen.is_set():
            return
        self.reach_consistent_point("preempt", stop=True)
        raise SIGTERMException()

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        """SIGTERM handler with several devices: a flag for the exchange, no collective inside a signal handler.

        (Lightning's own handler broadcasts on the default group, which would block while ranks run at their own
        pace; Lightning restores its original handlers when fit ends.)
        """
        if self._exchange is not None:
            self._exchange.sigterm_flag.set()

    def drain(self) -> None:
        """Wait until every in-flight backward has finished and applied its updates (a local consistent point)."""
        if self._engine is not None:
            self._engine.drain()

    def reach_consistent_point(self, kind: str, stop: bool = False) -> None:
        """Drain, and with several devices make every replica identical (all ranks meet here).

        A no-op across ranks when no training step ran since the last consistent point, except when the exchange
        must stop (end of fit): every rank takes the same decision, so the ranks' handshakes always match.
        """
        self.drain()
        exchange, engine = self._exchange, self._engine
        if exchange is None or engine is None or (self._in_sync and not stop):
            return
        exchange.consistent_point(kind, stop, engine.raise_if_failed)
        self._in_sync = True

    @override
    def on_train_end(self) -> None:
        self.reach_consistent_point("fit_end", stop=True)
        if self._exchange is not None:
            self._exchange.join(self._wait_timeout)
            self._exchange = None
        self._shutdown_engine()
        super().on_train_end()

    @override
    def on_validation_start(self) -> None:
        self.reach_consistent_point("validation")
        super().on_validation_start()

    @override
    def on_exception(self, exception: BaseException) -> None:
        try:
            if self._checkpoint_on_preemption and _is_preemption(exception) and self._engine is not None:
                self._save_preemption_checkpoint()
        finally:
            self._shutdown_engine(raise_timeout=False)
        super().on_exception(exception)

    def _save_preemption_checkpoint(self) -> None:
        """Write ``hpc_ckpt_<n>.ckpt`` (Lightning's preemption file name) through ``trainer.save_checkpoint``.

        The save drains the engine first; with several devices the SIGTERM path reached a consistent point before
        the exception, so every rank holds the merged replica and rank 0 writes it.
        """
        module = self.lightning_module
        if module is None or module._trainer is None:
            return
        trainer = module.trainer
        path = self.broadcast(_next_hpc_checkpoint_path(str(trainer.default_root_dir)))
        trainer.save_checkpoint(path)
        log.info("PD-ASGD: preemption checkpoint written to %s", path)

    @override
    def teardown(self) -> None:
        self._shutdown_engine(raise_timeout=False)
        super().teardown()

    def _shutdown_engine(self, raise_timeout: bool = True) -> None:
        exchange, self._exchange = self._exchange, None
        if exchange is not None:  # tell the other ranks this one stops, so none of them waits for it
            exchange.abort(timeout=min(self._wait_timeout, _ABORT_NOTICE_SECONDS))
        self._in_sync = True
        engine, self._engine = self._engine, None
        self._current = None
        if self._saved_num_threads is not None:
            torch.set_num_threads(self._saved_num_threads)
            self._saved_num_threads = None
        self._restore_switch_interval()
        self._tuner, self._plain_steps = None, False
        try:
            if engine is not None:
                engine.stop()
        except Exception:
            if raise_timeout:
                raise
            log.warning("PD-ASGD: engine shutdown timed out", exc_info=True)
        finally:
            self._updater, self._streams = None, None

    # ------------------------------------------------------------------------------------------- the step
    @override
    def training_step(self, *args: Any, **kwargs: Any) -> STEP_OUTPUT:
        engine, updater = self._engine, self._updater
        if engine is None or updater is None:
            return super().training_step(*args, **kwargs)
        if self._plain_steps:
            started = time.perf_counter()
            output = super().training_step(*args, **kwargs)
            self._stats.record_forward(time.perf_counter() - started, _batch_size(args))
            self._log_engine_metrics()
            return output
        engine.acquire_slot()
        self._in_sync = False
        try:
            stash = updater.stash()
            stream = self._streams.next() if self._streams is not None else None
            started = time.perf_counter()
            with streams.forward_on(stream), _internals.reparametrized(self.lightning_module, stash.tensors):
                output = super().training_step(*args, **kwargs)
            self._stats.record_forward(time.perf_counter() - started, _batch_size(args))
        except BaseException:
            engine.release_slot()
            raise
        self._current = (stash, stream)
        self._log_engine_metrics()
        return output

    def _restore_switch_interval(self) -> None:
        if self._saved_switch_interval is not None:
            sys.setswitchinterval(self._saved_switch_interval)
            self._saved_switch_interval = None

    def _autotune_step(self) -> None:
        assert self._tuner is not None
        stats = self._stats
        candidate = self._tuner.before_step((stats.total_staleness_sum, stats.total_updates))
        if candidate is not None:
            self._apply_candidate(candidate)
        if self._tuner.done:
            self.autotune_report = self._tuner.report()
            rank_zero_info(self.autotune_report)
            if self._plain_steps:  # the plain step won: nothing of the engine may cost anything from now on
                assert self._engine is not None
                self._engine.stop()
                self._restore_switch_interval()

    def _apply_candidate(self, candidate: Candidate) -> None:
        """Switch thread counts between two steps: drained, so no update is lost or reordered."""
        engine = self._engine
        assert engine is not None
        engine.drain()
        torch.set_num_threads(candidate.intra_op_threads or self._saved_num_threads or torch.get_num_threads())
        self._plain_steps = candidate.synchronous
        if candidate.synchronous:
            return
        threads = candidate.backward_threads
        in_flight = self._max_in_flight_arg or threads
        if (threads, in_flight) != (self._backward_threads, self._max_in_flight):
            engine.reconfigure(threads, in_flight)
            self._backward_threads, self._max_in_flight = threads, in_flight
            self._streams = streams.StreamPool(self.root_device, in_flight)

    @override
    def backward(self, closure_loss: Tensor, optimizer: Optional[Optimizer], *args: Any, **kwargs: Any) -> Tensor:
        if self._engine is None or self._current is None:
            return super().backward(closure_loss, optimizer, *args, **kwargs)
        module = self.lightning_module
        assert module is not None
        closure_loss = self.precision_plugin.pre_backward(closure_loss, module)
        _check_loss(closure_loss)
        stash, stream = self._current
        stash.step, stash.rank = module.trainer.global_step, self.global_rank
        if self._nonfinite != "off" and not bool(torch.isfinite(closure_loss.detach()).all()):
            if self._nonfinite == "error":
                raise NonFiniteError(
                    f"PD-ASGD: non-finite loss ({float(closure_loss.detach())}) at step {stash.step} on rank"
                    f" {stash.rank}; no update was applied from it. Pass `PDASGDStrategy(nonfinite='skip')` to drop"
                    " such steps and count them in `pdasgd/skipped_updates` instead."
                )
            self._stats.record_skipped_loss(len(stash.leaves))
            return closure_loss  # `optimizer_step` releases the slot of a loss that was not handed off
        stash.hyperparameters = hyperparameter_snapshot(self.optimizers[0])
        assert self._updater is not None
        self._engine.submit(BackwardWork(loss=closure_loss, context=(self._updater, stash, stream)))
        self._current = None  # the slot now belongs to the queued work
        return closure_loss

    @override
    def optimizer_step(
        self,
        optimizer: Optimizer,
        closure: Callable[[], Any],
        model: Optional[Union[LightningModule, torch.nn.Module]] = None,
        **kwargs: Any,
    ) -> Any:
        if self._tuner is not None and not self._tuner.done:
            self._autotune_step()  # before the closure: a step runs wholly in one configuration
        engine = self._engine
        if engine is None or self._plain_steps:
            return super().optimizer_step(optimizer, closure, model, **kwargs)
        engine.raise_if_failed()
        try:
            output = closure()
        finally:
            if self._current is not None:  # no loss was handed off (training_step returned None, or it raised)
                self._current = None
                engine.release_slot()
        _internals.mark_optimizer_stepped(getattr(optimizer, "_optimizer", optimizer))
        return output

    def _run_backward(self, work: BackwardWork) -> None:
        """Runs on a backward thread: the backward pass, whose hooks apply the updates layer by layer."""
        updater, stash, stream = work.context
        started = time.perf_counter()
        with streams.backward_on(stream):
            torch.autograd.backward(work.loss, inputs=stash.leaves)
            if not updater.layerwise:
                updater.apply_all(stash)
            streams.finish(stream)
        stash.record.seconds = time.perf_counter() - started
        self._stats.record_backward(stash.record)
        work.loss = None  # type: ignore[assignment]  # free the graph before the leaves are reused
        updater.release(stash, reusable=True)

    def _log_engine_metrics(self) -> None:
        """Log the engine's window of statistics on the steps Lightning writes to its loggers.

        ``self.log`` costs about a millisecond per call here, so it runs only when Lightning will write
        (``log_every_n_steps``); the window covers every step since the previous write.
        """
        module = self.lightning_module
        engine = self._engine
        if module is None or engine is None or module._trainer is None:
            return
        trainer = module.trainer
        if (trainer.global_step + 1) % trainer.log_every_n_steps != 0:
            return
        metrics = self._stats.take_window().as_metrics(engine.pending, self._log_grad_norm, self._backward_threads)
        metrics[WALL_TIME] = time.perf_counter() - self._fit_started_at
        metrics[BACKWARD_THREADS] = 0.0 if self._plain_steps else float(self._backward_threads)
        if self._exchange is not None:
            metrics.update(self._exchange.metrics())
        on_bar = {key: metrics.pop(key) for key in (SAMPLES_PER_SECOND, STALENESS_MEAN) if key in metrics}
        logger = bool(trainer.loggers)
        module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1, logger=logger)
        module.log_dict(on_bar, on_step=True, on_epoch=False, batch_size=1, logger=logger, prog_bar=True)

    # ------------------------------------------------------------------------------------------- checkpoints
    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        self.drain()
        return super().lightning_module_state_dict()

    @override
    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Tensor]:
        self.drain()
        return super().optimizer_state(optimizer)

    @override
    def load_optimizer_state_dict(self, checkpoint: Any) -> None:
        self.drain()
        super().load_optimizer_state_dict(checkpoint)

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register(
            cls.strategy_name, cls, description="Partial Decoupled Asynchronous SGD (lightning-pdasgd)"
        )

    @override
    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_engine"] = None
        state["_updater"] = None
        state["_streams"] = None
        state["_stats"] = None
        state["_current"] = None
        state["_exchange"] = None
        state["_exchange_group"] = None
        return state

    @override
    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._stats = EngineStats()


def _is_preemption(exception: BaseException) -> bool:
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    return isinstance(exception, (SIGTERMException, KeyboardInterrupt))


def _next_hpc_checkpoint_path(directory: str) -> str:
    """The next ``hpc_ckpt_<n>.ckpt`` in ``directory``: the name ``fit(ckpt_path="hpc")`` resumes from."""
    os.makedirs(directory, exist_ok=True)
    numbers = [
        int(match.group(1))
        for name in os.listdir(directory)
        if (match := re.fullmatch(r"hpc_ckpt_(\d+)\.ckpt", name)) is not None
    ]
    return os.path.join(directory, f"hpc_ckpt_{max(numbers, default=0) + 1}.ckpt")


def _batch_size(args: tuple[Any, ...]) -> int:
    try:
        return extract_batch_size(args[0]) if args else 0
    except Exception:  # noqa: BLE001 - a batch Lightning cannot size only leaves samples/s unknown
        return 0


def _check_loss(loss: Tensor) -> None:
    """Raise torch's own errors for a loss that cannot be back-propagated, in the main thread, before hand-off."""
    if loss.numel() != 1:
        raise RuntimeError(
            f"grad can be implicitly created only for scalar outputs (training_step returned a loss of shape"
            f" {tuple(loss.shape)}; reduce it to a scalar, e.g. with `.mean()`)"
        )
    if not loss.requires_grad:
        raise RuntimeError(
            "element 0 of tensors does not require grad and does not have a grad_fn (the loss returned by"
            " training_step is not connected to any trainable parameter)"
        )
