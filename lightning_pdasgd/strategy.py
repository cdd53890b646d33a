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
from collections.abc import Callable
from datetime import timedelta
from typing import Any, Literal, Optional, Union

import torch
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from lightning_pdasgd.checkpointing import DrainBeforeStateAccess
from lightning_pdasgd.claiming import claim_batches
from lightning_pdasgd.compensation import DEFAULT_STALENESS_COMPENSATION, StalenessCompensation
from lightning_pdasgd.config import DEFAULT_BUCKET_NUMEL, PDASGDConfig
from lightning_pdasgd.engine import BackwardEngine
from lightning_pdasgd.metrics import EngineStats
from lightning_pdasgd.session import FitSession
from lightning_pdasgd.updates import LayerwiseUpdater

from . import _internals, checks, preemption, steps  # relative: the Lightning-facing modules (_flavor.py)
from ._lightning import (
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
from .callbacks import EngineDrain
from .collectives import AsyncAwareCollectives
from .processes import OneProcessPerDevice

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
        self._steps: Optional[steps.StepAccounting] = None  # several devices, fitting: the global step count
        self.autotune_report: Optional[str] = None
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
    def step_accounting(self) -> Optional[steps.StepAccounting]:
        return self._steps  # several devices, while fitting: Lightning's step count over all ranks (`steps.py`)

    @override
    def process_dataloader(self, dataloader: object) -> object:
        """With several devices, share the training epoch dynamically (see ``claiming.py``)."""
        if self._steps is None or not self._steps.trainer.training:  # several devices, fitting (not validation)
            return dataloader
        return claim_batches(dataloader, self._steps.claim_key, self.world_size, self.global_rank)

    @override
    def setup_environment(self) -> None:
        super().setup_environment()
        self._steps = steps.prepare_fit(self)  # before the user's `setup`, which may load the data

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
            checks.check_fit_configuration(trainer, self.lightning_module, self.optimizers, self.world_size)
            EngineDrain.attach(trainer)

    @override
    def setup_optimizers(self, trainer: Trainer) -> None:
        with checks.one_optimizer_advice():
            super().setup_optimizers(trainer)

    @override
    def on_train_start(self) -> None:
        super().on_train_start()
        module = self.lightning_module
        assert module is not None
        trainer = module.trainer
        self._stats = EngineStats()
        session = FitSession.for_fit(self._config, trainer, self.optimizers[0], self.root_device, self._stats)
        self._session = session
        rank_zero_info(session.start_for(self.world_size, trainer.estimated_stepping_batches))
        if self.world_size > 1:
            steps.start_exchange(session, self.background_group, self._steps)
            preemption.watch_sigterm_through_exchange(trainer, session)

    @override
    def on_train_end(self) -> None:
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
        try:
            if self._config.checkpoint_on_preemption and preemption.is_preemption(exception) and self._session is not None:
                preemption.save_checkpoint(self)
        finally:
            self._shutdown(raise_timeout=False)
        super().on_exception(exception)

    @override
    def teardown(self) -> None:
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
            self._session.drain()

    def reach_consistent_point(self, kind: str, stop: bool = False) -> None:
        """Drain, and with several devices make every replica identical (all ranks meet here)."""
        if self._session is not None:
            self._session.reach_consistent_point(kind, stop)

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> STEP_OUTPUT:
        session = self._session
        if session is None:
            return super().training_step(*args, **kwargs)
        module = self.lightning_module
        session.follow_parameter_changes(self.optimizers, lambda: checks.check_trainer_settings(
            module.trainer, module, self.optimizers))
        output = session.forward(lambda: super(PDASGDStrategy, self).training_step(*args, **kwargs), args)
        session.log_metrics(self.lightning_module)
        return output

    @override
    def backward(self, closure_loss: Tensor, optimizer: Optional[Optimizer], *args: Any, **kwargs: Any) -> Tensor:
        session = self._session
        if session is None or not session.has_pending_forward:
            return super().backward(closure_loss, optimizer, *args, **kwargs)
        module = self.lightning_module
        assert module is not None
        closure_loss = self.precision_plugin.pre_backward(closure_loss, module)
        checks.check_loss(closure_loss)
        session.hand_off(closure_loss, module.trainer.global_step, self.global_rank)
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
            report = session.before_step()  # before the closure: a step runs wholly in one configuration
            if report is not None:
                self.autotune_report = report
                rank_zero_info(report)
        if session is None or session.plain_steps:
            return super().optimizer_step(optimizer, closure, model, **kwargs)
        session.engine.raise_if_failed()
        try:
            output = closure()
        finally:
            session.end_step()
        _internals.mark_optimizer_stepped(getattr(optimizer, "_optimizer", optimizer))
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
        return state

    @override
    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._stats = EngineStats()

