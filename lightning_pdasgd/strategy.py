"""The Lightning-facing strategy: ``Trainer(strategy="pdasgd")``.

It replaces exactly the synchronous step of automatic optimization (forward, backward, ``optimizer.step()``) and
keeps Lightning's fit and epoch loops, so step counting, validation triggers, callbacks, LR schedulers, loggers and
checkpoint keys stay those of a plain run. Lightning's loop thread is the forward thread: ``training_step`` runs
there on a private copy of the weights, ``backward`` hands the loss to the engine instead of running it, and
``optimizer_step`` runs the closure without stepping the optimizer. Everything that exists only while fit trains
lives in one ``FitSession`` (``session.py``); see ``DESIGN.md`` beside this file for the module map.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import timedelta
from types import TracebackType
from typing import Any, Literal, Optional, Union

import torch
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from lightning_pdasgd.config import DEFAULT_BUCKET_NUMEL, PDASGDConfig
from lightning_pdasgd.distributed.claiming import claim_batches
from lightning_pdasgd.engine import _torch_internals
from lightning_pdasgd.engine.backward_threads import BackwardEngine
from lightning_pdasgd.engine.compensation import DEFAULT_STALENESS_COMPENSATION, StalenessCompensation
from lightning_pdasgd.engine.layerwise_updates import LayerwiseUpdater
from lightning_pdasgd.engine.metrics import EngineStats
from lightning_pdasgd.engine.session import FitSession

from .callbacks import EngineDrain
from .integration import _lightning_internals, preemption, setup_checks  # relative: flavoured (_flavor.py)
from .integration._lightning import (
    STEP_OUTPUT,
    Accelerator,
    CheckpointIO,
    ClusterEnvironment,
    LightningModule,
    Precision,
    Trainer,
    TrainerFn,
    default_pg_timeout,
    rank_zero_info,
    rank_zero_warn,
)
from .integration.collectives import AsyncAwareCollectives
from .integration.one_process_per_device import OneProcessPerDevice
from .integration.state_access import DrainBeforeStateAccess
from .integration.step_accounting import StepAccounting, prepare_fit, start_exchange

log = logging.getLogger(__name__)


class PDASGDStrategy(DrainBeforeStateAccess, AsyncAwareCollectives, OneProcessPerDevice):
    """Partial Decoupled Asynchronous SGD (arXiv 2410.05985) for any LightningModule with automatic optimization.

    Every argument is described, with examples, in ``docs/configuration.md``.

    Args:
        forward_threads: threads that run ``training_step``: Lightning's loop thread, so ``1`` (or ``"auto"``).
        backward_threads: threads that run backward passes and apply the updates; ``"auto"`` times candidates
            (1-3 threads, intra-op settings, the plain step) on the first steps and keeps the fastest whose mean
            staleness is at most ``autotune_max_staleness`` (``autotune.py``).
        max_in_flight: most losses whose backward has not finished (default: ``backward_threads``); ``1`` gives
            exactly the plain synchronous result.
        layerwise: update each bucket the moment its gradients are ready (PD-ASGD); ``False``: the D-ASGD
            ablation, one whole-model update at the end of each backward.
        lazy_reads: read each bucket's weights when the forward reaches its module (the output side then trains
            almost without delay); ``False``: read every bucket when the step starts (``reads.py``).
        divergence_guard: watch the loss; on a blow-up restore the last good weights and optimizer state and go
            on with less asynchrony, warning once (``guard.py``). ``False``: the raw behaviour.
        wait_timeout: seconds any engine wait (a free slot, a drain, a consistent point, shutdown) may take
            before it fails with an error naming it.
        intra_op_threads: intra-op threads of each engine thread; ``None``: the core budget (``budget.py``).
        log_grad_norm: also log ``pdasgd/grad_norm``, the mean L2 norm of each backward's gradient.
        exchange_interval: several devices: least seconds between the starts of two exchange rounds.
        nonfinite: a NaN/Inf loss or gradient: ``"error"`` (stop, naming step, parameter and rank), ``"skip"``
            (drop that update, count it in ``pdasgd/skipped_updates``) or ``"off"``.
        checkpoint_on_preemption: on SIGTERM or Ctrl-C, drain, reach a consistent point and save
            ``hpc_ckpt_<n>.ckpt`` (``fit(ckpt_path="hpc")`` resumes from it).
        autotune_steps: training steps timed per candidate when a thread count is ``"auto"``.
        autotune_max_staleness: the bound on mean staleness a candidate must respect to be chosen.
        bucket_numel: parameters updated together in one optimizer call: a module's always, and consecutive
            modules until a bucket holds this many elements (``0``: one bucket per module).
        metrics: the ``pdasgd/*`` metrics logged: ``"basic"`` (throughput, staleness, queue, wall time),
            ``"full"`` or ``"off"``.
        metrics_on_progress_bar: show ``pdasgd/samples_per_sec`` and ``pdasgd/staleness_mean`` on the bar.
        staleness_compensation: how updates correct for their staleness (``compensation.py``):
            ``"predict+momentum"`` (default), ``"predict"``, ``"momentum"``, ``"lr"``, ``"dc"``, ``"none"``, or a
            ``StalenessCompensation``. Updates of staleness 0 are never changed.
    """

    strategy_name = "pdasgd"

    def __init__(
        self,
        forward_threads: Union[int, Literal["auto"]] = 1,
        backward_threads: Union[int, Literal["auto"]] = 2,
        max_in_flight: Optional[int] = None,
        layerwise: bool = True,
        lazy_reads: bool = True,
        divergence_guard: bool = True,
        wait_timeout: float = 600.0,
        intra_op_threads: Optional[int] = None,
        log_grad_norm: bool = False,
        exchange_interval: float = 0.0,
        nonfinite: str = "error",
        checkpoint_on_preemption: bool = True,
        autotune_steps: int = 6,
        autotune_max_staleness: float = 4.0,
        bucket_numel: int = DEFAULT_BUCKET_NUMEL,
        metrics: str = "basic",
        metrics_on_progress_bar: bool = True,
        staleness_compensation: Union[str, StalenessCompensation] = DEFAULT_STALENESS_COMPENSATION,
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
            process_group_backend=process_group_backend,
            timeout=timeout,
            background_group_timeout=timedelta(seconds=float(wait_timeout)),
        )
        self._config = PDASGDConfig.from_arguments(
            forward_threads=forward_threads,
            backward_threads=backward_threads,
            max_in_flight=max_in_flight,
            layerwise=layerwise,
            lazy_reads=bool(lazy_reads),
            divergence_guard=bool(divergence_guard),
            wait_timeout=float(wait_timeout),
            intra_op_threads=intra_op_threads,
            log_grad_norm=log_grad_norm,
            exchange_interval=float(exchange_interval),
            nonfinite=nonfinite,
            checkpoint_on_preemption=checkpoint_on_preemption,
            autotune_steps=autotune_steps,
            autotune_max_staleness=float(autotune_max_staleness),
            bucket_numel=bucket_numel,
            metrics=metrics,
            metrics_on_progress_bar=metrics_on_progress_bar,
            staleness_compensation=staleness_compensation,
        )
        self._stats = EngineStats()
        self._session: Optional[FitSession] = None  # exists while fit trains; the strategy stays picklable
        self._steps: Optional[StepAccounting] = None  # several devices, fitting: the global step count
        self.autotune_report: Optional[str] = None
        self._fit_loop_started = False  # on_train_start came, on_exception/teardown not yet (`training_step`)
        self._in_optimizer_step = False  # a closure run inside `optimizer_step` closes its accumulation window
        for warning in self._config.ineffective_settings():
            rank_zero_warn(warning)

    @property
    def config(self) -> PDASGDConfig:
        return self._config

    @property
    def backward_threads(self) -> int:
        return self._session.backward_threads if self._session is not None else self._config.backward_threads

    @property
    def forward_threads(self) -> int:
        return self._config.forward_threads

    @property
    def max_in_flight(self) -> int:
        return self._session.max_in_flight if self._session is not None else self._config.in_flight

    @property
    def layerwise(self) -> bool:
        return self._config.layerwise

    @property
    def stats(self) -> EngineStats:
        return self._stats

    @property
    def engine(self) -> Optional[BackwardEngine]:
        return self._session.engine if self._session is not None else None

    @property
    def updater(self) -> Optional[LayerwiseUpdater]:
        return self._session.updater if self._session is not None else None

    @property
    @override
    def _asynchronous(self) -> bool:
        return self._session is not None and self._session.asynchronous

    @property
    def step_accounting(self) -> Optional[StepAccounting]:
        return self._steps  # several devices, while fitting: Lightning's step count over all ranks (`step_accounting.py`)

    @override
    def process_dataloader(self, dataloader: object) -> object:
        """With several devices, share the training epoch dynamically (see ``claiming.py``)."""
        if self._steps is None or not self._steps.trainer.training:  # several devices, fitting (not validation)
            return dataloader
        return claim_batches(dataloader, self._steps.claim_key, self.process_count, self.global_rank)

    @override
    def setup_environment(self) -> None:
        super().setup_environment()
        # before the user's `setup`, which may load the data; one process never shares its data, whatever
        # `world_size` was set to (`processes.py`)
        self._steps = prepare_fit(self) if self.process_count > 1 else None

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
            _lightning_internals.optimizers_to_device(self.optimizers, self.root_device)
            setup_checks.check_fit_configuration(trainer, self.lightning_module, self.optimizers, self.process_count)
            EngineDrain.attach(trainer)

    @override
    def setup_optimizers(self, trainer: Trainer) -> None:
        with setup_checks.one_optimizer_advice():
            super().setup_optimizers(trainer)

    @override
    def on_train_start(self) -> None:
        super().on_train_start()
        self._fit_loop_started = True
        with _EngineCall("the start of training"):
            self._start_session()

    def _start_session(self) -> None:
        """A new session for a run of Lightning's fit loop; a previous one still open is ended first.

        Lightning's tuner runs the fit loop several times in one fit (``scale_batch_size``'s trials,
        ``lr_find``): a trial whose error the tuner caught (an out-of-memory batch) never reaches
        ``on_train_end``, and an ``lr_find`` started from a callback runs inside a run that goes on after it.
        """
        module = self.lightning_module
        assert module is not None
        trainer = module.trainer
        self._end_stale_session()
        self._stats = EngineStats()
        session = FitSession.for_fit(self._config, trainer, self.optimizers[0], self.root_device, self._stats,
                                     accumulate=setup_checks.accumulates_gradients(trainer))
        self._session = session
        rank_zero_info(session.start_for(self.process_count, trainer.estimated_stepping_batches))
        if self.process_count > 1:
            start_exchange(session, self.background_group, self._steps)
            preemption.watch_sigterm_through_exchange(trainer, session)

    def _end_stale_session(self) -> None:
        """Stop the threads of a session whose run ended without ``on_train_end``; apply what it has in flight."""
        session, self._session = self._session, None
        if session is None:
            return
        try:
            session.drain()
        except Exception:  # noqa: BLE001 - its run failed already; the error was raised (and handled) there
            log.debug("PD-ASGD: the drain of a previous run's engine failed", exc_info=True)
        session.shutdown(raise_timeout=False)

    @override
    def on_train_end(self) -> None:
        with _EngineCall("the end of training"):
            if self._session is not None:
                self._session.finish_fit()
            self._shutdown()
        super().on_train_end()

    @override
    def on_validation_start(self) -> None:
        self.reach_consistent_point("validation")
        super().on_validation_start()

    @override
    def on_exception(self, exception: BaseException) -> None:
        self._fit_loop_started = False
        try:
            preempted = self._config.checkpoint_on_preemption and preemption.is_preemption(exception)
            if preempted and self._session is not None:
                preemption.save_checkpoint(self)
        finally:
            self._shutdown(raise_timeout=False)
        super().on_exception(exception)

    @override
    def teardown(self) -> None:
        self._fit_loop_started = False
        self._shutdown(raise_timeout=False)
        super().teardown()

    def _shutdown(self, raise_timeout: bool = True) -> None:
        session, self._session = self._session, None
        self._steps = self._steps.uninstall() if self._steps is not None else None  # gives Lightning's loops back
        if session is not None:
            session.shutdown(raise_timeout)

    def drain(self) -> None:
        """Wait until every in-flight backward has finished and applied its updates (a local consistent point)."""
        if self._session is not None:
            with _EngineCall("a drain"):
                self._session.drain()

    def reach_consistent_point(self, kind: str, stop: bool = False) -> None:
        """Drain, and with several devices make every replica identical (all ranks meet here)."""
        if self._session is not None:
            with _EngineCall(f"the {kind} consistent point"):
                self._session.reach_consistent_point(kind, stop)

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> STEP_OUTPUT:
        if self._session is None and self._fit_loop_started and self.process_count == 1:
            # a run of the fit loop inside this one (`lr_find` from a callback) ended the session: a new one
            with _EngineCall("the restart of training"):
                self._start_session()
        session = self._session
        if session is None:
            return super().training_step(*args, **kwargs)
        module = self.lightning_module
        raised_by_step: list[BaseException] = []

        def run_step() -> STEP_OUTPUT:
            try:
                return super(PDASGDStrategy, self).training_step(*args, **kwargs)
            except StopIteration as stop:  # `next(dataloader_iter)` in the step: Lightning's end of the epoch
                raised_by_step.append(stop)
                raise

        with _EngineCall("a training step", passed_through=raised_by_step):
            session.follow_parameter_changes(self.optimizers, lambda: setup_checks.check_trainer_settings(
                module.trainer, module, self.optimizers))
            output = session.forward(run_step, args)
            if _logs_metrics(module.trainer):
                session.log_metrics(module)
        return output

    @override
    def backward(self, closure_loss: Tensor, optimizer: Optional[Optimizer], *args: Any, **kwargs: Any) -> Tensor:
        session = self._session
        if session is None or not session.has_pending_forward:
            return super().backward(closure_loss, optimizer, *args, **kwargs)
        module = self.lightning_module
        assert module is not None
        closure_loss = self.precision_plugin.pre_backward(closure_loss, module)
        setup_checks.check_loss(closure_loss)
        with _EngineCall("the hand-off of a loss"):
            # Lightning runs the closure inside `optimizer_step` only for the batch that ends an accumulation window
            session.hand_off(closure_loss, module.trainer.global_step, self.global_rank, self._in_optimizer_step)
        return closure_loss

    @override
    def optimizer_step(
        self,
        optimizer: Optimizer,
        closure: Callable[[], Any],
        model: Optional[Union[LightningModule, torch.nn.Module]] = None,
        **kwargs: Any,
    ) -> Any:
        session = self._session
        if session is not None:
            with _EngineCall("an optimizer step"):
                report = session.before_step()  # before the closure: a step runs wholly in one configuration
            if report is not None:
                self.autotune_report = report
                rank_zero_info(report)
        if session is None or session.plain_steps:
            return super().optimizer_step(optimizer, closure, model, **kwargs)
        with _EngineCall("an optimizer step"):
            session.engine.raise_if_failed()
        self._in_optimizer_step = True
        try:
            output = closure()  # the user's step: its StopIteration is Lightning's (`training_step` above)
        finally:
            self._in_optimizer_step = False
            with _EngineCall("an optimizer step"):
                session.end_step()
        _torch_internals.mark_optimizer_stepped(getattr(optimizer, "_optimizer", optimizer))
        return output

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register(
            cls.strategy_name, cls, description="Partial Decoupled Asynchronous SGD (lightning-pdasgd)"
        )

    @override
    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_session"] = None
        state["_stats"] = None
        state["_steps"] = None
        state["_fit_loop_started"] = False
        return state

    @override
    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._stats = EngineStats()


def _logs_metrics(trainer: Trainer) -> bool:
    """``Trainer(barebones=True)`` makes ``self.log`` raise and ``log_every_n_steps=0`` writes no logs (it is the
    divisor of the metrics' schedule): with either, the ``pdasgd/*`` metrics are not logged."""
    return not getattr(trainer, "barebones", False) and trainer.log_every_n_steps > 0


class _EngineCall:
    """Turns a ``StopIteration`` raised by PD-ASGD's own code into a ``RuntimeError`` that says where it came from.

    Lightning's loops take a ``StopIteration`` from any hook for the end of the data: the epoch (or the whole fit)
    ends silently there, and with ``max_steps`` the next epoch hits it again, forever. A patched
    ``time.perf_counter`` whose ``side_effect`` list ran out (Lightning's ``ThroughputMonitor`` tests) raised one
    in the engine's timing. Those in ``passed_through`` (the user's step exhausting ``dataloader_iter``) stay.
    """

    def __init__(self, where: str, passed_through: Sequence[BaseException] = ()) -> None:
        self._where = where
        self._passed_through = passed_through

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: Optional[type[BaseException]], error: Optional[BaseException], trace: Optional[TracebackType]
    ) -> bool:
        if not isinstance(error, StopIteration) or any(error is allowed for allowed in self._passed_through):
            return False
        raise RuntimeError(
            f"PD-ASGD: StopIteration was raised inside the engine during {self._where}, not by the training data;"
            " Lightning would have ended the epoch there without a step. An iterator or mock with a finite"
            " `side_effect` ran out, e.g. `mock.patch('time.perf_counter', side_effect=[...])`, whose values the"
            " engine's timing reads too: give the mock enough values, or patch the module that should see them"
            " (e.g. `lightning.pytorch.callbacks.throughput_monitor.time`)."
        ) from error
