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
    extract_batch_size,
    rank_zero_info,
    rank_zero_warn,
)
from .callbacks import EngineDrain
from .collectives import AsyncAwareCollectives
from .processes import OneProcessPerDevice

log = logging.getLogger(__name__)


class PDASGDStrategy(AsyncAwareCollectives, OneProcessPerDevice):
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
        intra_op_threads: intra-op threads of each engine thread (forward and backward). ``None``: the core budget,
            the cores torch would use (``torch.get_num_threads()``) split over the threads that compute at once.
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
        bucket_numel: parameters updated together in one optimizer call: a module's parameters always, and
            consecutive modules until a bucket holds at least this many elements (``0``: one bucket per module).
        metrics: the ``pdasgd/*`` metrics logged every ``log_every_n_steps`` and at epoch ends: ``"basic"``
            (throughput, staleness, queue depth, wall time), ``"full"`` (every figure of the engine) or ``"off"``.
        metrics_on_progress_bar: show ``pdasgd/samples_per_sec`` and ``pdasgd/staleness_mean`` on the bar.
        staleness_compensation: how updates correct for their staleness so hyperparameters tuned for plain
            Lightning keep working (``compensation.py``, ``docs/convergence.md``): ``"predict+momentum"``
            (default), ``"predict"``, ``"momentum"``, ``"lr"``, ``"dc"``, ``"none"``, or a
            ``StalenessCompensation``. Updates of staleness 0 are never changed (``max_in_flight=1`` stays plain).
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

    # ------------------------------------------------------------------------------------------- properties
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
            checks.check_fit_configuration(trainer, self.lightning_module, self.optimizers, self.world_size)
            EngineDrain.attach(trainer)

    @override
    def setup_optimizers(self, trainer: Trainer) -> None:
        with checks.one_optimizer_advice():
            super().setup_optimizers(trainer)

    # ------------------------------------------------------------------------------------------- fit lifecycle
    @override
    def on_train_start(self) -> None:
        super().on_train_start()
        module = self.lightning_module
        assert module is not None
        trainer = module.trainer
        clip = float(trainer.gradient_clip_val) if trainer.gradient_clip_val else None
        self._stats = EngineStats()
        session = FitSession(self._config, module, self.optimizers[0], self.root_device, self._stats, clip)
        self._session = session
        plan = session.plan_autotune(self.world_size, trainer.estimated_stepping_batches) if self._config.autotune else None
        if self._config.autotune and plan is None:
            rank_zero_info("PD-ASGD: the run is too short for autotuning; keeping the configured thread counts.")
        session.start(plan)
        rank_zero_info(session.describe(self.world_size))
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

    # ------------------------------------------------------------------------------------------- the step
    @override
    def training_step(self, *args: Any, **kwargs: Any) -> STEP_OUTPUT:
        session = self._session
        if session is None:
            return super().training_step(*args, **kwargs)
        if not session.plain_steps:  # the plain step (chosen by "auto") reads the parameter set as it is
            self._follow_parameter_changes(session)
        output = session.forward(
            lambda: super(PDASGDStrategy, self).training_step(*args, **kwargs), _batch_size(args), inputs=args
        )
        session.log_metrics(self.lightning_module)
        return output

    def _follow_parameter_changes(self, session: FitSession) -> None:
        """Fine-tuning, pruning, ``requires_grad`` toggles, a re-created optimizer: rebuild before this forward."""
        change = session.parameter_set_change(self.optimizers[0]) if len(self.optimizers) == 1 else "optimizers"
        if change is None:
            return
        module = self.lightning_module
        checks.check_trainer_settings(module.trainer, module, self.optimizers)
        log.debug("PD-ASGD: %s; rebuilding the engine's buckets", change)
        session.rebuild(self.optimizers[0])

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
        state["_session"] = None
        state["_stats"] = None
        state["_steps"] = None
        return state

    @override
    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._stats = EngineStats()


def _batch_size(args: tuple[Any, ...]) -> int:
    try:
        return extract_batch_size(args[0]) if args else 0
    except Exception:  # noqa: BLE001 - a batch Lightning cannot size only leaves samples/s unknown
        return 0
