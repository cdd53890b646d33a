"""The strategy's engine while it fits: one ``FitSession`` at a time, its statistics, and with several devices the
step count over ranks. Started and ended from Lightning's hooks; the strategy only asks it.

Lightning's tuner runs the fit loop several times in one fit (``scale_batch_size``'s trials, ``lr_find``): a trial
whose error the tuner caught (an out-of-memory batch) never reaches ``on_train_end``, and an ``lr_find`` started from
a callback runs inside a run that goes on after it. So a new session first ends one still open.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from lightning_pdasgd.config import PDASGDConfig
from lightning_pdasgd.engine.metrics import EngineStats
from lightning_pdasgd.engine.session import FitSession

from . import preemption, setup_checks
from ._lightning import MisconfigurationException, TrainerFn, rank_zero_info, rank_zero_warn
from .fault_tolerant_fit import FaultTolerantFit
from .step_accounting import StepAccounting, prepare_fit, start_exchange

log = logging.getLogger(__name__)


class FitSessions:
    """Owns the current session (``None`` outside a run of the fit loop), the latest statistics and the step
    accounting of several devices."""

    def __init__(self, config: PDASGDConfig) -> None:
        self._config = config
        self.session: Optional[FitSession] = None
        self.steps: Optional[StepAccounting] = None  # several devices, fitting: the global step count
        self._stats: Optional[EngineStats] = None
        self.loop_started = False  # on_train_start came, on_exception/teardown not yet
        self.lightning_only: Optional[str] = None  # why this fit runs without any session (manual optimization)
        self.fault_tolerant: Optional[FaultTolerantFit] = FaultTolerantFit(config) if config.fault_tolerant else None

    @property
    def stats(self) -> EngineStats:
        """The engine's statistics of the current or latest fit (empty before the first)."""
        if self._stats is None:
            self._stats = EngineStats()
        return self._stats

    def prepare(self, strategy: Any) -> None:
        """Before the user's ``setup`` (which may load the data): several devices count steps over the ranks; one
        process never shares its data, whatever ``world_size`` was set to."""
        if self.fault_tolerant is not None:
            module = strategy.lightning_module
            trainer = module._trainer if module is not None else None
            fitting = trainer is not None and trainer.state.fn == TrainerFn.FITTING
            self.steps = self.fault_tolerant.prepare(trainer) if fitting else None
            return
        self.steps = prepare_fit(strategy) if strategy.process_count > 1 else None

    def start(self, strategy: Any, at_first_step: bool = False, training_data: Any = None) -> None:
        """A new session for a run of Lightning's fit loop (a previous one still open is ended first).

        One device, nothing trainable yet (a fine-tuning callback unfreezes the backbone when the first epoch
        starts): the session starts at the first step instead, ``at_first_step``. Fault-tolerant: the session
        starts when the training data is set up (``training_data``, its ledger sampler), before Lightning takes the
        first batch; ``on_train_start`` then finds it running.
        """
        module = strategy.lightning_module
        trainer = module.trainer
        if self.fault_tolerant is not None and training_data is None and self.session is not None:
            return  # started with the training data, in this run of the fit loop
        self._end_stale()
        self.lightning_only = None
        waits_for_unfreezing = strategy.process_count == 1 and not at_first_step
        if waits_for_unfreezing and not setup_checks.trains_a_parameter(strategy.optimizers):
            return
        reason = setup_checks.synchronous_reason(module, trainer.callbacks, self._config.gradient_hooks,
                                                 strategy.optimizers)
        if reason is not None:
            rank_zero_warn(f"PD-ASGD trains with Lightning's own synchronous step: {reason}.")
        if not setup_checks.has_one_trainable_optimizer(strategy.optimizers):  # manual or no optimizer, one device
            self.lightning_only = reason  # nothing of the engine: no buckets to build, no replicas to exchange
            return
        clip_value, clip_norm = setup_checks.gradient_clipping(trainer)
        session = FitSession(self._config, module, strategy.optimizers[0], strategy.root_device, clip_value, clip_norm,
                             accumulate=setup_checks.accumulates_gradients(trainer), synchronous_reason=reason)
        self.session, self._stats = session, session.stats
        # (Lightning is setting up the training data when the fault-tolerant mode starts: its length is unknown yet)
        run_steps = float("inf") if training_data is not None else trainer.estimated_stepping_batches
        warmup = self._config.warmup_steps(run_steps, trainer.global_step, strategy.process_count)  # (fixed, extra)
        rank_zero_info(session.start_for(strategy.process_count, run_steps, warmup))
        if self.fault_tolerant is not None:
            if training_data is None:
                raise MisconfigurationException(
                    "PD-ASGD `fault_tolerant=True` starts with the training data; nothing was trainable then."
                )
            self.fault_tolerant.start(trainer, session, self.steps, training_data)
        elif strategy.process_count > 1:
            start_exchange(session, strategy.background_group, strategy.root_device, self.steps)
            preemption.watch_sigterm_through_exchange(trainer, session)

    def check_fault_tolerance(self, strategy: Any) -> None:
        """Fault-tolerant, at setup: refuse what the mode cannot do yet."""
        if self.fault_tolerant is not None:
            module = strategy.lightning_module
            self.fault_tolerant.check_settings(module.trainer, module, strategy.process_count, strategy.root_device)

    def fault_tolerant_training_data(self, strategy: Any, dataloader: object) -> object:
        """The training loader fed by the replicas' ledger; the session starts here, since the ledger must be joined
        before Lightning takes the first batch (it does so while it sets up the data, before ``on_train_start``)."""
        assert self.fault_tolerant is not None
        loader = self.fault_tolerant.training_data(dataloader)
        if self.session is None:
            self.loop_started = True
            self.start(strategy, training_data=loader.batch_sampler)
        return loader

    def follow_parameter_changes(self, strategy: Any) -> None:
        """Before a step: the engine follows a changed parameter set, after the setup checks on it."""
        module, optimizers = strategy.lightning_module, strategy.optimizers
        assert self.session is not None
        self.session.follow_parameter_changes(
            optimizers, lambda: setup_checks.check_trainer_settings(module.trainer, module, optimizers)
        )

    @property
    def needs_restart(self) -> bool:
        """No session runs although the fit loop does: nothing was trainable at its start, or a run of the fit loop
        inside this one (``lr_find`` from a callback) ended the session. A new one is due."""
        return self.session is None and self.loop_started and self.lightning_only is None

    def _end_stale(self) -> None:
        """Stop the threads of a session whose run ended without ``on_train_end``; apply what it has in flight."""
        session, self.session = self.session, None
        if session is None:
            return
        try:
            session.drain()
        except Exception:  # noqa: BLE001 - its run failed already; the error was raised (and handled) there
            log.debug("PD-ASGD: the drain of a previous run's engine failed", exc_info=True)
        session.shutdown(raise_timeout=False)

    def shutdown(self, raise_timeout: bool = True) -> None:
        """End the session and give Lightning's loops back."""
        session, self.session = self.session, None
        self.steps = self.steps.uninstall() if self.steps is not None else None
        if session is not None:
            session.shutdown(raise_timeout)
        if self.fault_tolerant is not None:
            self.fault_tolerant.stop()
