"""The fault-tolerant mode's part of a fit (``PDASGDStrategy(fault_tolerant=True)``, on torchft).

Each replica is its own process and its own Lightning run on one device (``world_size`` 1 for Lightning): the
replicas meet only through the fault-tolerant exchange (``fault_tolerance/``). This module connects that to
Lightning: the training data comes from the claim ledger, a replica that joins a running job starts its loop at the
job's epoch and step count, the job's step count follows every replica's batches, and checkpoints and logs are
written by the lowest live replica.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Optional

import torch
from lightning_utilities.core.rank_zero import rank_zero_only  # the one object both Lightning packages use
from torch.utils.data import DataLoader

from lightning_pdasgd.config import PDASGDConfig
from lightning_pdasgd.engine.session import FitSession
from lightning_pdasgd.fault_tolerance.ledger_sampler import LedgerBatchSampler, ledger_dataloader
from lightning_pdasgd.fault_tolerance.link import FaultTolerantLink
from lightning_pdasgd.fault_tolerance.torchft_adapter import FaultToleranceSettings, require_torchft

from . import _lightning_internals
from ._lightning import MisconfigurationException
from .step_accounting import StepAccounting

log = logging.getLogger(__name__)

_LEAST_EXCHANGE_INTERVAL_S = 0.02  # a round asks the lighthouse for a quorum: not back to back


class FaultTolerantStepAccounting(StepAccounting):
    """The job's step count (``step_accounting.py``) with the ledger's epoch length; the ledger makes the counts
    exact on every replica at a consistent point, so there is nothing to compare there."""

    def __init__(self, trainer: Any) -> None:
        super().__init__(trainer, world_size=1, claim_key=(0, ""))
        self.job_batches: Callable[[], int] = lambda: 0  # the ledger's count of the job's batches in the anchor

    _sampler_type = LedgerBatchSampler

    def _after_setup_data(self) -> None:
        sampler = self._claiming_sampler()
        if sampler is None:
            return
        self._limit_epoch(sampler)
        _lightning_internals.set_num_training_batches(self._trainer, sampler.epoch_batches)

    def _check_last_epoch_of_max_steps(self) -> None:
        """``max_steps`` is refused in this mode (``check_settings``)."""

    def settle(self, kind: str) -> None:
        """At a consistent point every replica's ``global_step`` is the ledger's count of the job's batches.

        Exact however the replicas came and went: a replica that healed had counted batches whose updates it dropped
        (the survivors trained them again), so its count may move back here.
        """
        if not self.active:
            return
        trainer = self._trainer
        now = _lightning_internals.global_step(trainer)
        self.local_batches += now - self._counted
        target = self.job_batches()
        if target != now:
            _lightning_internals.advance_step_counters(trainer, target - now)
        self._counted = target
        remote = self._remote()
        self._remote_counted = remote
        epoch_remote = remote - self._epoch_remote_start
        _lightning_internals.advance_batch_counters(trainer, epoch_remote - self._epoch_remote_in_batches)
        self._epoch_remote_in_batches = epoch_remote


class FaultTolerantFit:
    """One strategy's fault-tolerant mode: its link to the other replicas while a fit trains."""

    def __init__(self, config: PDASGDConfig) -> None:
        self._config = config
        self.link: Optional[FaultTolerantLink] = None

    def check_settings(self, trainer: Any, module: Any, process_count: int, device: torch.device) -> None:
        """Refuse what this mode cannot do yet, each with the setting to change."""
        require_torchft()
        self._settings()
        if process_count > 1:
            raise MisconfigurationException(
                "PD-ASGD `fault_tolerant=True` runs each replica as its own process with one device, got"
                f" {process_count} processes. Launch one `python train.py` per replica with `Trainer(devices=1)` (see"
                " docs/fault-tolerance.md)."
            )
        if device.type != "cpu":
            raise MisconfigurationException(
                "PD-ASGD `fault_tolerant=True` exchanges over gloo on the CPU for now; train with"
                " `accelerator='cpu'`, or without `fault_tolerant` on GPUs."
            )
        if not module.automatic_optimization:
            raise MisconfigurationException(
                "PD-ASGD `fault_tolerant=True` needs automatic optimization (the engine applies every update)."
            )
        if str(trainer.precision) not in ("32-true", "64-true", "32", "64"):
            raise MisconfigurationException(
                f"PD-ASGD `fault_tolerant=True` exchanges float32/float64 parameters: `precision={trainer.precision!r}`"
                " is not supported yet. Use `precision='32-true'`."
            )
        if trainer.max_steps not in (None, -1):
            raise MisconfigurationException(
                f"PD-ASGD `fault_tolerant=True` stops by epochs: `Trainer(max_steps={trainer.max_steps})` is not"
                " supported yet. Use `max_epochs` (and `limit_train_batches` to shorten an epoch)."
            )
        if trainer.accumulate_grad_batches > 1:
            raise MisconfigurationException(
                "PD-ASGD `fault_tolerant=True` marks a batch trained when its update is applied;"
                f" `accumulate_grad_batches={trainer.accumulate_grad_batches}` holds updates back. Raise the batch"
                " size instead."
            )

    def _settings(self) -> FaultToleranceSettings:
        config = self._config
        return FaultToleranceSettings.resolve(
            config.lighthouse, config.replica, config.max_replicas, config.ft_timeout, config.wait_timeout
        )

    def prepare(self, trainer: Any) -> FaultTolerantStepAccounting:
        accounting = FaultTolerantStepAccounting(trainer)
        accounting.install()
        return accounting

    def training_data(self, dataloader: object) -> DataLoader:
        """The training loader, its batches granted by the ledger."""
        loader = ledger_dataloader(dataloader, lambda: self.link) if isinstance(dataloader, DataLoader) else None
        if loader is None:
            raise MisconfigurationException(
                "PD-ASGD `fault_tolerant=True` hands out the training batches by index: it needs a map-style dataset"
                " with a plain batch sampler (a `DataLoader(dataset, batch_size=..., shuffle=...)`)."
            )
        return loader

    def start(
        self, trainer: Any, session: FitSession, accounting: Optional[StepAccounting], sampler: LedgerBatchSampler
    ) -> None:
        """Join the replicas (a joiner takes a live peer's state), then start this loop where the job is.

        Runs while Lightning sets up the training data, before it takes the first batch (``process_dataloader``).
        """
        sampler.forwards_begun = lambda: session.completion.begun
        sampler.raise_if_failed = session.threads.engine.raise_if_failed
        config = self._config
        self.link = link = FaultTolerantLink(
            self._settings(),
            epoch_batches=sampler.epoch_batches,
            seed=torch.initial_seed() % (2**31 - 1),
            interval_s=max(config.exchange_interval, _LEAST_EXCHANGE_INTERVAL_S),
            wait_timeout_s=config.wait_timeout,
            finished_total=lambda: session.completion.frontier,
            merge=config.replica_merge,
        )
        link.on_quorum = self.follow_lowest_live
        # a joiner's callbacks continue the job's (ModelCheckpoint's files: `last.ckpt`, not a new `last-v1.ckpt`)
        link.save_extra = lambda: {"callbacks": _lightning_internals.callbacks_state(trainer)}
        link.load_extra = lambda state: _lightning_internals.load_callbacks_state(trainer, state["callbacks"])
        session.join_peers(link, on_consistent=accounting.settle if accounting is not None else None)
        epoch = link.member_epoch()
        sampler.set_epoch(epoch)  # Lightning takes the first batch before it sets the first epoch
        if epoch != trainer.current_epoch:
            log.info("PD-ASGD: joining the replicas at epoch %d, step %d", epoch, link.committed_at_start)
            _lightning_internals.set_current_epoch(trainer, epoch)
        behind = link.committed_at_start - _lightning_internals.global_step(trainer)
        if behind > 0:
            _lightning_internals.advance_step_counters(trainer, behind)
        if accounting is not None:
            if isinstance(accounting, FaultTolerantStepAccounting):
                accounting.job_batches = lambda: link.ledger.committed_batches
            accounting.start(lambda: session.exchange.remote_batches if session.exchange is not None else 0)
        self.follow_lowest_live()

    @property
    def live_replicas(self) -> int:
        return self.link.participants if self.link is not None else 1

    @property
    def lowest_live(self) -> bool:
        """This replica writes checkpoints and logs: it has the lowest rank in the last quorum (or none started)."""
        return self.link is None or self.link.participating_rank in (None, 0)

    def follow_lowest_live(self) -> None:
        """Loggers write on "rank zero": the lowest live replica (another one if that replica died); called after
        every quorum (an attribute that loggers read when they are called)."""
        rank_zero_only.rank = 0 if self.lowest_live else 1

    def stop(self) -> None:
        link, self.link = self.link, None
        if link is not None:
            link.close()


class FaultTolerantRanks:
    """The strategy's ranks in the fault-tolerant mode, where every replica is Lightning's rank 0 of one device:
    the lowest live replica writes checkpoints, and ``live_replicas`` says how many train now."""

    _fit: Any
    process_count: int

    @property
    def is_global_zero(self) -> bool:
        fault_tolerant = self._fit.fault_tolerant
        return fault_tolerant.lowest_live if fault_tolerant is not None else super().is_global_zero  # type: ignore[misc]

    @property
    def live_replicas(self) -> int:
        """Replicas training now: fault-tolerant, those in the last quorum; else the number of processes."""
        fault_tolerant = self._fit.fault_tolerant
        return fault_tolerant.live_replicas if fault_tolerant is not None else self.process_count
