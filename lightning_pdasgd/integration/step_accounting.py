"""One step count on several devices: Lightning's counters follow the batches applied by all ranks together.

Every replica applies every rank's updates, so the count of batches trained by all ranks together is what one
device would have counted. With dynamic claiming a fast rank trains more batches than a slow one, so each rank's own
count means nothing on its own; this module keeps Lightning's step-keyed state on the global count instead:

* ``global_step`` and the logging step (``_batches_that_stepped``) advance by this rank's batches (Lightning's own
  increment) and by the other ranks' batches as the exchange reports them (one int64 per round). An advance never
  jumps over a multiple of ``log_every_n_steps``: the remainder waits for the next local batch, so the rank that
  writes logs writes at every logging step, as one device does.
* step-interval LR schedulers are stepped once per counted batch (respecting ``frequency``, counted from the epoch's
  start as Lightning does), so the schedule advances at the pace of the whole job, not of one rank.
* at every consistent point the exchange's totals are exact: every rank brings ``global_step``, the logging step,
  the epoch's batch counts and its schedulers to the same values, then the ranks compare them (an error for the
  counts; for a scheduler that still differs, e.g. ``ReduceLROnPlateau`` on an unsynced metric, rank 0's state
  with a warning).
* an epoch has the single-device number of batches: ``trainer.num_training_batches`` is the whole epoch's count, so
  ``estimated_stepping_batches`` is the single-device total; ``limit_train_batches`` limits the epoch of all ranks
  together, and ``max_steps`` cuts the claims of the last epoch so that exactly ``max_steps`` batches are trained.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from lightning_pdasgd.distributed.claiming import ClaimingBatchSampler, SharedEpochBatchSampler, new_claim_key
from lightning_pdasgd.distributed.replica_link import ReplicaLink
from lightning_pdasgd.errors import StepMismatchError

from . import _lightning_internals, setup_checks  # relative: the Lightning-facing modules of this flavour (_flavor.py)
from ._lightning import MisconfigurationException, TrainerFn, rank_zero_warn

if TYPE_CHECKING:
    from lightning_pdasgd.engine.session import FitSession

log = logging.getLogger(__name__)


class StepAccounting:
    """Lightning's step counters, schedulers and epoch length on the global batch count (one fit, one rank).

    Args:
        trainer: the Trainer being fitted.
        world_size: the number of ranks.
        claim_key: what every rank agreed on for dynamic claiming (``claiming.new_claim_key``).
    """

    def __init__(self, trainer: Any, world_size: int, claim_key: tuple[int, str]) -> None:
        self._trainer = trainer
        self._world_size = world_size
        self.claim_key = claim_key
        self._user_limit: int | float | None = None  # limit_train_batches, applied to all ranks together
        self._undo: Callable[[], None] | None = None
        self._remote: Callable[[], int] = lambda: 0
        self.active = False
        self.local_batches = 0  # batches this rank trained in this fit (the exchange sums them)
        self._start_step = 0  # global_step when this fit started training (0, or a checkpoint's)
        self._counted = 0  # global_step after the last update here: what Lightning adds on top is local
        self._remote_counted = 0  # other ranks' batches already in global_step
        self._epoch_start_step = 0  # exact global_step at the current epoch's start
        self._resumed_in_epoch = 0  # batches of the current epoch a mid-epoch checkpoint had already trained
        self._epoch_remote_start = 0  # other ranks' batches before the current epoch
        self._epoch_remote_in_batches = 0  # other ranks' batches of this epoch added to the batch counters
        self.adopted = 0  # consistent points at which a scheduler state had to be taken from rank 0

    @property
    def trainer(self) -> Any:
        return self._trainer

    # ------------------------------------------------------------------------------------------- lifecycle
    def install(self) -> None:
        """Before the user's ``setup``/``configure_optimizers`` can load the training data: wrap Lightning's loops."""
        trainer = self._trainer
        limit = trainer.limit_train_batches
        if limit != 0 and not (isinstance(limit, float) and limit == 1.0):
            # Lightning would apply it to each rank's share (and make the claiming loader sized); the sampler applies
            # it to the whole epoch instead. Restored in `uninstall`.
            self._user_limit, trainer.limit_train_batches = limit, 1.0
        self._undo = _lightning_internals.wrap_loop_methods(trainer, self._after_setup_data, self._update_lr_schedulers)

    def uninstall(self) -> None:
        """Give Lightning its own loops and the user's ``limit_train_batches`` back (fit ended, however)."""
        self.active = False
        if self._undo is not None:
            self._undo()
            self._undo = None
        if self._user_limit is not None:
            self._trainer.limit_train_batches, self._user_limit = self._user_limit, None

    def start(self, remote_batches: Callable[[], int]) -> None:
        """Training starts (after a checkpoint's counters were restored): count from here."""
        trainer = self._trainer
        step = _lightning_internals.global_step(trainer)
        self._start_step = self._counted = step
        self._resumed_in_epoch = _lightning_internals.epoch_batches_ready(trainer)  # a mid-epoch checkpoint's, or 0
        self._epoch_start_step = step - self._resumed_in_epoch
        self.local_batches = self._remote_counted = self._epoch_remote_start = self._epoch_remote_in_batches = 0
        self._remote = remote_batches
        self.active = True
        self._check_last_epoch_of_max_steps()

    def on_epoch_start(self) -> None:
        """A training epoch starts: the previous one ended at a consistent point, so the counts are exact."""
        if not self.active:
            return
        self._epoch_start_step = _lightning_internals.global_step(self._trainer)
        self._resumed_in_epoch = 0
        self._epoch_remote_start = self._remote_counted
        self._epoch_remote_in_batches = 0

    # ------------------------------------------------------------------------------------------- the epoch's batches
    _sampler_type: type[SharedEpochBatchSampler] = ClaimingBatchSampler  # what shares the epoch's batches

    def _claiming_sampler(self) -> Any:
        loader = self._trainer.train_dataloader  # one DataLoader, or a collection (not claimed)
        sampler = loader.batch_sampler if isinstance(loader, DataLoader) else None
        return sampler if isinstance(sampler, self._sampler_type) else None

    def _limit_epoch(self, sampler: SharedEpochBatchSampler) -> None:
        """``limit_train_batches`` limits the epoch of all ranks together, not each rank's share."""
        limit = self._user_limit
        if isinstance(limit, float):
            sampler.max_batches = int(sampler.num_batches * limit)
        elif isinstance(limit, int):
            sampler.max_batches = limit

    def _after_setup_data(self) -> None:
        """The training data is loaded: the epoch's length is the single-device one (``num_training_batches``)."""
        sampler = self._claiming_sampler()
        if sampler is None:
            return
        self._limit_epoch(sampler)
        limit = self._user_limit
        sampler.budget = self._budget
        if sampler.epoch_batches < self._world_size:
            raise MisconfigurationException(
                f"PD-ASGD on {self._world_size} devices needs at least one training batch per rank and epoch, but an"
                f" epoch has {sampler.epoch_batches} (`limit_train_batches={limit}` applies to all ranks together)."
                f" Raise `limit_train_batches` to at least {self._world_size}, or train on fewer devices."
            )
        _lightning_internals.set_num_training_batches(self._trainer, sampler.epoch_batches)

    def _budget(self, epoch_batches: int) -> int:
        """How many claims the current epoch may still take (all ranks together).

        ``max_steps`` leaves ``max_steps`` minus the exact count at the epoch's start; an epoch resumed from a
        mid-epoch checkpoint already trained some of its batches (and re-claims from the start, as a single device
        restarts a dataloader that cannot resume), so only the rest of its length is claimed.
        """
        max_steps = self._trainer.max_steps
        start = self._epoch_start_step if self.active else _lightning_internals.global_step(self._trainer)
        length = epoch_batches if max_steps is None or max_steps < 0 else min(epoch_batches, max_steps - start)
        return max(length - (self._resumed_in_epoch if self.active else 0), 0)

    def _check_last_epoch_of_max_steps(self) -> None:
        """Every rank must train a batch in the epoch ``max_steps`` cuts short, or the ranks' epochs cannot meet."""
        sampler, max_steps = self._claiming_sampler(), self._trainer.max_steps
        if sampler is None or max_steps is None or max_steps < 0:
            return
        last = (max_steps - self._epoch_start_step) % sampler.epoch_batches
        if 0 < last < self._world_size:
            raise MisconfigurationException(
                f"`Trainer(max_steps={max_steps})` leaves {last} batch(es) for the last epoch"
                f" ({sampler.epoch_batches} batches per epoch), fewer than the {self._world_size} ranks, and every rank"
                f" needs one to reach the epoch's end with the others. Use a `max_steps` that leaves 0 or at least"
                f" {self._world_size} batches for the last epoch."
            )

    # ------------------------------------------------------------------------------------------- during an epoch
    def _update_lr_schedulers(
        self, original: Callable[[str, bool], None], interval: str, update_plateau_schedulers: bool
    ) -> None:
        """Replaces Lightning's per-batch scheduler update: the step counters and step schedulers follow all ranks."""
        if not self.active or interval != "step" or update_plateau_schedulers:
            original(interval, update_plateau_schedulers)  # epoch-interval and plateau schedulers: Lightning's own
            return
        self.after_local_step()

    def after_local_step(self) -> None:
        """After this rank's batch: count it, then the other ranks' batches reported since (see the module doc)."""
        trainer = self._trainer
        now = _lightning_internals.global_step(trainer)
        self.local_batches += now - self._counted
        self._step_schedulers(self._counted, now)
        self._counted = now
        pending = self._remote() - self._remote_counted
        every = trainer.log_every_n_steps
        if every > 0:  # never jump over a logging step: stop at the next multiple (this batch is logged there)
            pending = min(pending, math.ceil(now / every) * every - now)
        if pending > 0:
            self._advance(pending)
            self._remote_counted += pending

    def _advance(self, steps: int) -> None:
        _lightning_internals.advance_step_counters(self._trainer, steps)
        self._step_schedulers(self._counted, self._counted + steps)
        self._counted += steps

    def _step_schedulers(self, before: int, after: int) -> None:
        """Step every non-plateau step-interval scheduler for each counted batch in ``(before, after]``."""
        configs = [
            config
            for config in self._trainer.lr_scheduler_configs
            if config.interval == "step" and not config.reduce_on_plateau
        ]
        if not configs:
            return
        for position in range(before + 1, after + 1):
            in_epoch = position - self._epoch_start_step
            for config in configs:
                if in_epoch % config.frequency == 0:
                    _lightning_internals.step_lr_scheduler(self._trainer, config)

    # ------------------------------------------------------------------------------------------- consistent points
    def settle(self, kind: str) -> None:
        """At a consistent point (every rank drained, the exchange's counts exact): every rank to the same count."""
        if not self.active:
            return
        trainer = self._trainer
        now = _lightning_internals.global_step(trainer)
        self.local_batches += now - self._counted  # normally 0: every local step was counted after its batch
        self._counted = now
        remote = self._remote()
        behind = self._start_step + self.local_batches + remote - now
        if behind < 0:
            raise StepMismatchError(
                f"PD-ASGD: rank counted {now} steps but all ranks trained {now + behind} at the {kind!r} consistent"
                " point."
            )
        self._advance(behind)
        self._remote_counted = remote
        epoch_remote = remote - self._epoch_remote_start
        _lightning_internals.advance_batch_counters(trainer, epoch_remote - self._epoch_remote_in_batches)
        self._epoch_remote_in_batches = epoch_remote
        self._verify(kind)

    def fingerprint(self) -> dict[str, Any]:
        """What every rank must agree on at a consistent point: the counts and every scheduler's state."""
        trainer = self._trainer
        schedulers = [
            (type(config.scheduler).__name__, _plain(config.scheduler.state_dict()))
            for config in trainer.lr_scheduler_configs
        ]
        groups = [_plain({k: v for k, v in g.items() if k != "params"}) for g in trainer.optimizers[0].param_groups]
        counts = (
            _lightning_internals.global_step(trainer),
            _lightning_internals.batches_that_stepped(trainer),
            _lightning_internals.epoch_batches_ready(trainer),
        )
        return {"counts": counts, "schedulers": schedulers, "param_groups": groups}

    def _verify(self, kind: str) -> None:
        mine = self.fingerprint()
        everyone: list[Any] = [None] * self._world_size
        dist.all_gather_object(everyone, mine)
        if any(other["counts"] != mine["counts"] for other in everyone):
            raise StepMismatchError(
                f"PD-ASGD: ranks disagree on (global_step, logging step, epoch batches) at the {kind!r} consistent"
                f" point: {[other['counts'] for other in everyone]}."
            )
        if all(other["schedulers"] == mine["schedulers"] for other in everyone) and all(
            other["param_groups"] == mine["param_groups"] for other in everyone
        ):
            return
        self._adopt_rank_zero(kind)

    def _adopt_rank_zero(self, kind: str) -> None:
        """Some scheduler moved differently on some rank (e.g. a plateau scheduler fed an unsynced metric)."""
        trainer = self._trainer
        optimizer = trainer.optimizers[0]
        state = [
            [config.scheduler.state_dict() for config in trainer.lr_scheduler_configs],
            [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups],
        ]
        holder = [state if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(holder, src=0)
        schedulers, groups = holder[0]
        for config, scheduler_state in zip(trainer.lr_scheduler_configs, schedulers):
            config.scheduler.load_state_dict(scheduler_state)
        for group, hyperparameters in zip(optimizer.param_groups, groups):
            group.update(hyperparameters)
        self.adopted += 1
        rank_zero_warn(
            f"PD-ASGD: the LR schedulers' states differed between ranks at the {kind!r} consistent point; every rank"
            " now uses rank 0's. Log the metrics that `ReduceLROnPlateau` monitors with `sync_dist=True`."
        )


def _plain(value: Any) -> Any:
    """The comparable part of a state dict: numbers, strings and containers of them (functions, tensors dropped)."""
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    if isinstance(value, dict):
        items = {str(key): _plain(item) for key, item in value.items()}
        return {key: item for key, item in sorted(items.items()) if item is not _SKIP}
    if isinstance(value, (list, tuple)):
        return [item for item in map(_plain, value) if item is not _SKIP]
    return _SKIP


_SKIP: Any = object()


def prepare_fit(strategy: Any) -> StepAccounting | None:
    """In ``setup_environment`` (several devices, fitting): agree the claim key and wrap the loops.

    Before the user's ``setup`` and ``configure_optimizers``, either of which may load the training data (through
    ``trainer.estimated_stepping_batches``): the data must be claimed from the first load on.
    """
    module = strategy.lightning_module
    if strategy.world_size <= 1 or module is None or module._trainer is None:
        return None
    trainer = module.trainer
    if trainer.state.fn != TrainerFn.FITTING:
        return None
    setup_checks.check_multi_device_settings(trainer)
    accounting = StepAccounting(trainer, strategy.world_size, strategy.broadcast(new_claim_key()))
    accounting.install()
    return accounting


def start_exchange(session: FitSession, group: Any, device: torch.device, accounting: StepAccounting | None) -> None:
    """Start the session's exchange with this rank's batch count in its rounds, and count steps from its totals."""
    config = session.config
    link = ReplicaLink(
        group,
        device,
        interval_s=config.exchange_interval,
        timeout_s=config.wait_timeout,
        merge=config.replica_merge,
        local_batches=(lambda: accounting.local_batches) if accounting is not None else (lambda: 0),
    )
    session.join_peers(link, on_consistent=accounting.settle if accounting is not None else None)
    if accounting is not None:
        accounting.start(lambda: session.exchange.remote_batches if session.exchange is not None else 0)
