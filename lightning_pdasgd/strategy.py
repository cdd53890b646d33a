"""``Trainer(strategy="pdasgd")``: replaces exactly the synchronous step of automatic optimization and keeps
Lightning's fit and epoch loops (step counting, validation, callbacks, schedulers, loggers, checkpoints).

Lightning's loop thread is the forward thread: ``training_step`` runs there on the weights each layer reads,
``backward`` hands the loss to the engine, ``optimizer_step`` runs the closure without stepping the optimizer. The
engine of a fit is a ``FitSession`` (``integration/fit_sessions.py``); ``DESIGN.md`` has the module map.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from time import perf_counter
from typing import Any, Literal, Optional, Union

import torch
from torch.optim import Optimizer
from typing_extensions import override

from lightning_pdasgd.config import DEFAULT_BUCKET_NUMEL, DEFAULT_SYNCHRONOUS_WARMUP, BucketSize, PDASGDConfig
from lightning_pdasgd.distributed.claiming import claim_batches
from lightning_pdasgd.engine import _torch_internals
from lightning_pdasgd.engine.backward_threads import BackwardEngine
from lightning_pdasgd.engine.compensation import DEFAULT_STALENESS_COMPENSATION, StalenessCompensation
from lightning_pdasgd.engine.layerwise_updates import LayerwiseUpdater
from lightning_pdasgd.engine.metrics import EngineStats
from lightning_pdasgd.engine.session import FitSession
from lightning_pdasgd.engine.thread_control import runs_lightnings_step

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
from .integration.engine_calls import EngineCall
from .integration.engine_hooks import EngineHooks
from .integration.fault_tolerant_fit import FaultTolerantRanks
from .integration.fit_sessions import FitSessions
from .integration.one_process_per_device import OneProcessPerDevice
from .integration.state_access import DrainBeforeStateAccess
from .integration.step_accounting import StepAccounting
from .integration.step_metrics import StepMetrics


class PDASGDStrategy(FaultTolerantRanks, DrainBeforeStateAccess, AsyncAwareCollectives, OneProcessPerDevice):
    """Partial Decoupled Asynchronous SGD (arXiv 2410.05985) for any LightningModule with automatic optimization.

    Every argument is described, with examples, in ``docs/configuration.md``.

    Args:
        forward_threads: threads that run ``training_step``: Lightning's loop thread, so ``1`` (or ``"auto"``).
        backward_threads: threads that run backward passes and apply the updates; default 2 (1 on a CPU with under 3
            cores); ``"auto"`` times 1-3 threads, intra-op settings and the plain step, and keeps the fastest.
        max_in_flight: most losses whose backward has not finished (default: 2, or ``backward_threads``); ``1``: exact.
        layerwise: update each bucket when its gradients are ready; ``False``: one update per backward (D-ASGD).
        lazy_reads: read each bucket's weights when the forward reaches its module (``False``: all at the start).
        divergence_guard: on a loss blow-up restore the last good state, go on with less asynchrony, warn once.
        wait_timeout: seconds any engine wait (a slot, a drain, a consistent point, shutdown) may take; then an error.
        intra_op_threads: intra-op threads of each engine thread; ``None``: the core budget (``autotune.py``).
        log_grad_norm: also log ``pdasgd/grad_norm``, the mean L2 norm of each backward's gradient.
        exchange_interval, replica_merge: several devices: least seconds between the starts of two exchange rounds;
            a round merges the ranks' updates by their ``"mean"`` (default, as DDP: keep its lr) or ``"sum"``.
        nonfinite: a NaN/Inf loss or gradient: ``"error"`` (stop, naming step, parameter and rank), ``"skip"``
            (drop that update, count it in ``pdasgd/skipped_updates``) or ``"off"``.
        checkpoint_on_preemption: on SIGTERM or Ctrl-C drain, save ``hpc_ckpt_<n>.ckpt``, ``fit(ckpt_path="hpc")``.
        autotune_steps, autotune_max_staleness: ``"auto"``: steps timed per candidate; its bound on mean staleness.
        bucket_numel: parameters updated together in one optimizer call: a module's always, and consecutive modules
            until a bucket holds this many elements (``0``: a bucket per module; ``"auto"``: 65,536, or 0 below that).
        metrics: ``pdasgd/*`` metrics logged: ``"basic"`` (throughput, staleness, queue, time), ``"full"``, ``"off"``.
        metrics_on_progress_bar: also show ``pdasgd/samples_per_sec`` and ``pdasgd/staleness_mean``.
        gradient_hooks: overrides that need the whole model's gradient (``on_after_backward``, ...):
            ``"synchronous"`` runs Lightning's own step for them; ``"skip"`` trains asynchronously without them.
        staleness_compensation: how updates correct for their staleness: ``"predict"`` (default),
            ``"predict+momentum"``, ``"momentum"``, ``"lr"``, ``"dc"``, ``"none"``, or a ``StalenessCompensation``.
        synchronous_warmup: the first steps one loss in flight: ``"auto"``, a fraction of the run (<= 500 steps), steps.
        fault_tolerant, lighthouse, replica, max_replicas, ft_timeout: see ``docs/fault-tolerance.md`` (torchft).
    """

    strategy_name = "pdasgd"

    def __init__(
        self,
        forward_threads: Union[int, Literal["auto"]] = 1,
        backward_threads: Union[int, Literal["auto"], None] = None,
        max_in_flight: Optional[int] = None,
        layerwise: bool = True,
        lazy_reads: bool = True,
        divergence_guard: bool = True,
        wait_timeout: float = 600.0,
        intra_op_threads: Optional[int] = None,
        log_grad_norm: bool = False,
        exchange_interval: float = 0.0, replica_merge: Literal["mean", "sum"] = "mean",
        nonfinite: str = "error",
        checkpoint_on_preemption: bool = True,
        autotune_steps: int = 6, autotune_max_staleness: float = 4.0,
        bucket_numel: BucketSize = DEFAULT_BUCKET_NUMEL,
        metrics: str = "basic",
        metrics_on_progress_bar: bool = False,
        gradient_hooks: Literal["synchronous", "skip"] = "synchronous",
        staleness_compensation: Union[str, StalenessCompensation] = DEFAULT_STALENESS_COMPENSATION,
        synchronous_warmup: Union[int, float, Literal["auto"]] = DEFAULT_SYNCHRONOUS_WARMUP,
        fault_tolerant: bool = False, lighthouse: Optional[str] = None, replica: Optional[int] = None,
        max_replicas: int = 16, ft_timeout: float = 5.0,
        accelerator: Optional[Accelerator] = None,
        parallel_devices: Optional[list[torch.device]] = None,
        cluster_environment: Optional[ClusterEnvironment] = None,
        checkpoint_io: Optional[CheckpointIO] = None,
        precision_plugin: Optional[Precision] = None,
        process_group_backend: Optional[str] = None,
        timeout: Optional[timedelta] = default_pg_timeout,
    ) -> None:
        super().__init__(
            accelerator=accelerator, parallel_devices=parallel_devices, cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io, precision_plugin=precision_plugin, process_group_backend=process_group_backend,
            timeout=timeout, background_group_timeout=timedelta(seconds=float(wait_timeout)))
        arguments = locals()  # the PD-ASGD settings among them, validated once (`config.py`)
        self._config = PDASGDConfig.from_arguments(**{name: arguments[name] for name in PDASGDConfig.ARGUMENTS})
        self._fit = FitSessions(self._config)  # exists while fit trains; the strategy stays picklable
        self.autotune_report: Optional[str] = None
        self.in_optimizer_step = False  # a closure run inside `optimizer_step` closes its accumulation window
        self._hooks = EngineHooks(self)  # the engine's callback and backward routing on Lightning's path
        self._step_metrics = StepMetrics()  # the `pdasgd/*` metrics, retired once Lightning has taken them
        for warning in self._config.ineffective_settings():
            rank_zero_warn(warning)

    @property
    def config(self) -> PDASGDConfig:
        return self._config

    @property
    def backward_threads(self) -> int:
        if self._session:
            return self._session.threads.settings.backward_threads
        return self._config.backward_threads_on(self.root_device if self.parallel_devices else None)

    @property
    def forward_threads(self) -> int:
        return self._config.forward_threads

    @property
    def max_in_flight(self) -> int:
        return self._session.threads.settings.max_in_flight if self._session else self._config.in_flight

    @property
    def layerwise(self) -> bool:
        return self._config.layerwise

    @property
    def stats(self) -> EngineStats:
        """The engine's statistics of the current or latest fit (empty before the first)."""
        return self._fit.stats

    @property
    def _session(self) -> Optional[FitSession]:
        return self._fit.session

    @property
    def engine(self) -> Optional[BackwardEngine]:
        return self._session.threads.engine if self._session is not None else None

    @property
    def updater(self) -> Optional[LayerwiseUpdater]:
        return self._session.updater if self._session is not None else None

    @property
    @override
    def _asynchronous(self) -> bool:
        return self._session is not None and self._session.asynchronous

    @property
    def step_accounting(self) -> Optional[StepAccounting]:
        """Several devices, while fitting: Lightning's step count over all ranks (``step_accounting.py``)."""
        return self._fit.steps

    @override
    def process_dataloader(self, dataloader: object) -> object:
        """With several devices, share the training epoch dynamically (``claiming.py``, or ``claim_ledger.py``)."""
        steps = self._fit.steps
        if steps is None or not steps.trainer.training:  # several devices, fitting (not validation)
            return dataloader
        if self._fit.fault_tolerant is not None:
            with EngineCall("the start of training"):
                return self._fit.fault_tolerant_training_data(self, dataloader)
        return claim_batches(dataloader, steps.claim_key, self.process_count, self.global_rank)

    @override
    def setup_environment(self) -> None:
        super().setup_environment()
        self._fit.prepare(self)

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
            self._fit.check_fault_tolerance(self)
            if not (self.process_count == 1 and runs_lightnings_step(self._config.in_flight, self._config.autotune)):
                self._hooks.install(trainer)  # (the exact mode on one device: nothing of the engine's on the way)

    @override
    def setup_optimizers(self, trainer: Trainer) -> None:
        with setup_checks.one_optimizer_advice():
            super().setup_optimizers(trainer)

    @override
    def on_train_start(self) -> None:
        super().on_train_start()
        self._fit.loop_started = True
        with EngineCall("the start of training"):
            self._fit.start(self)

    @override
    def on_train_end(self) -> None:
        with EngineCall("the end of training"):
            if self._session is not None:
                self._step_metrics.flush(self._session)
                self._session.finish_fit()
            self._fit.shutdown()
        super().on_train_end()

    @override
    def on_validation_start(self) -> None:
        self.reach_consistent_point("validation")
        super().on_validation_start()

    @override
    def on_exception(self, exception: BaseException) -> None:
        self._fit.loop_started = False
        try:
            preempted = self._config.checkpoint_on_preemption and preemption.is_preemption(exception)
            if preempted and (self._session is not None or self._fit.lightning_only is not None):
                preemption.save_checkpoint(self)
        finally:
            self._fit.shutdown(raise_timeout=False)
        super().on_exception(exception)

    @override
    def teardown(self) -> None:
        self._fit.loop_started = False
        self._fit.shutdown(raise_timeout=False)
        self._hooks.remove(self.lightning_module)
        super().teardown()

    def drain(self) -> None:
        """Wait until every in-flight backward has finished and applied its updates (a local consistent point)."""
        if self._session is not None and not self._session.lightning_steps_only:  # (else none is in flight)
            with EngineCall("a drain"):
                self._session.drain()

    def reach_consistent_point(self, kind: str, stop: bool = False) -> None:
        """Drain, and with several devices make every replica identical (all ranks meet here)."""
        if self._session is not None:
            with EngineCall(f"the {kind} consistent point"):
                self._session.reach_consistent_point(kind, stop)

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> STEP_OUTPUT:
        session = self._session
        if session is None or session is not self._hooks.aside_for:  # (else one device, Lightning's step for good)
            if self._fit.needs_restart and self.process_count == 1:  # nothing was trainable at the start, or a
                with EngineCall("the start of training"):  # fit loop inside this one (`lr_find`) ended it: a new one
                    self._fit.start(self, at_first_step=True)
            if (session := self._session) is None:
                return super().training_step(*args, **kwargs)
            self._hooks.follow(session, self.lightning_module.trainer)  # the engine's hooks on or off for this step
            if not self._hooks.lightning_step_alone:
                return self._engine_training_step(session, args, kwargs)
        with EngineCall("a training step"):  # one device, Lightning's own step: only counted
            started = perf_counter()
        output = super().training_step(*args, **kwargs)
        with EngineCall("a training step"):
            self._step_metrics.lightning_step_ended(session, self.lightning_module, started, args)
        return output

    def _engine_training_step(self, session: FitSession, args: tuple[Any, ...], kwargs: dict[str, Any]) -> STEP_OUTPUT:
        """``training_step`` on the engine's stash of the weights (or, on several devices, Lightning's own step)."""
        module = self.lightning_module
        raised_by_step: list[BaseException] = []

        def run_step() -> STEP_OUTPUT:
            try:
                return super(PDASGDStrategy, self).training_step(*args, **kwargs)
            except StopIteration as stop:  # `next(dataloader_iter)` in the step: Lightning's end of the epoch
                raised_by_step.append(stop)
                raise

        with EngineCall("a training step", passed_through=raised_by_step):
            self._step_metrics.before_step(module.trainer)
            self._fit.follow_parameter_changes(self)
            output = session.forward(run_step, args)
            self._step_metrics.after_step(session, module)
        return output

    @override
    def optimizer_step(
        self,
        optimizer: Optimizer,
        closure: Callable[[], Any],
        model: Optional[Union[LightningModule, torch.nn.Module]] = None,
        **kwargs: Any,
    ) -> Any:
        session = self._session
        if session is None or session is self._hooks.aside_for:  # Lightning's step for good: nothing of the engine's
            return super().optimizer_step(optimizer, closure, model, **kwargs)
        with EngineCall("an optimizer step"):
            report = session.before_step()  # before the closure: a step runs wholly in one configuration
        if report is not None:
            self.autotune_report = report
            rank_zero_info(report)
        if session.threads.plain_steps:
            with EngineCall("an optimizer step"):
                self._fit.follow_parameter_changes(self)  # several devices: a rebuild meets the exchange, unheld
            with session.plain_step():  # several devices: no merge of the exchange inside Lightning's step
                return super().optimizer_step(optimizer, closure, model, **kwargs)
        with EngineCall("an optimizer step"):
            session.threads.engine.raise_if_failed()
        self.in_optimizer_step = True
        try:
            output = closure()  # the user's step: its StopIteration is Lightning's (`training_step` above)
        finally:
            self.in_optimizer_step = False
            with EngineCall("an optimizer step"):
                session.end_step()
        _torch_internals.mark_optimizer_stepped(getattr(optimizer, "_optimizer", optimizer))
        return output

    @override
    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_fit"] = FitSessions(self._config)
        return state
