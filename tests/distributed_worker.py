"""One rank of a real multi-process run (gloo on CPU), launched by Lightning's own subprocess launcher.

Run as ``python tests/distributed_worker.py CASE OUT_DIR [ARGS...]``: Lightning re-runs this script for every
other local rank. Each rank writes what the test needs to ``OUT_DIR/CASE-rank{R}.pt``.

Every CASE is a function registered with ``@case("name")`` in :data:`CASES` (see the bottom of this file); its
docstring says what the test that launches it (``tests/test_distributed.py``) checks. A case function gets the
output folder, this rank's :class:`BatchLog` and the extra ``ARGS`` (strings), runs fit, and returns the trainer
and the case's own result keys; :func:`main` adds the keys every case has (``batches``, ``train_seconds``,
``global_step``, ``rank``) and saves the result.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402

from lightning_pdasgd import PDASGDStrategy, Straggler  # noqa: E402
from tests.helpers import LEARN_EPOCHS, trainer_kwargs  # noqa: E402
from tests.models import LR, CheckpointedDigits, DigitsClassifier, DigitsData, LinearLoss, integer_batches  # noqa: E402


class BatchLog(Callback):
    """Records how many batches this rank trained and for how long."""

    def __init__(self) -> None:
        self.batches = 0
        self.train_seconds = 0.0
        self._started = 0.0

    def on_train_epoch_start(self, *args: Any) -> None:
        self._started = time.perf_counter()

    def on_train_batch_end(self, *args: Any) -> None:
        self.batches += 1

    def on_train_epoch_end(self, *args: Any) -> None:
        self.train_seconds += time.perf_counter() - self._started


class HoldUntilOtherRankTrains(Callback):
    """Rank 1 stops after its first batch until rank 0 has trained ``batches`` more: an event, not a timing.

    If rank 0 waited for rank 1 at any step (lockstep, as in DDP), neither could go on and the store's wait would
    time out; so reaching the end of fit proves the fast rank never waits for the slow one.
    """

    def __init__(self, batches: int, timeout_s: float = 60.0) -> None:
        self.batches, self.timeout_s, self._seen = batches, timeout_s, 0

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        from datetime import timedelta

        from torch.distributed.distributed_c10d import _get_default_store

        store = _get_default_store()
        self._seen += 1
        if trainer.global_rank == 0 and self._seen == self.batches:
            store.set("test/rank0-trained", "1")
        elif trainer.global_rank == 1 and self._seen == 1:
            store.wait(["test/rank0-trained"], timedelta(seconds=self.timeout_s))


class FailOnRank(Callback):
    """Raises on one rank mid-epoch, or (``hard=True``) kills that process without any cleanup."""

    def __init__(self, rank: int, batch: int, hard: bool = False) -> None:
        self.rank, self.batch, self.hard = rank, batch, hard

    def on_train_batch_end(self, trainer: L.Trainer, module: Any, outputs: Any, batch: Any, idx: int) -> None:
        if trainer.global_rank == self.rank and idx == self.batch:
            if self.hard:
                print(f"rank {self.rank} dies", file=sys.stderr, flush=True)
                os._exit(17)
            raise RuntimeError(f"boom on rank {self.rank}")


class BarTotal(Callback):
    """Reads the progress bar's total (TQDM or Rich) once the epoch is under way, on the rank that shows it."""

    total: Any = None

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        from lightning.pytorch.callbacks import RichProgressBar

        bar = trainer.progress_bar_callback
        if self.total is not None or bar is None or bar.is_disabled:
            return
        if isinstance(bar, RichProgressBar):
            assert bar.progress is not None
            (task,) = [task for task in bar.progress.tasks if task.id == bar.train_progress_bar_id]
            self.total = task.total
        else:
            self.total = bar.train_progress_bar.total


class DieInEpoch(Callback):
    """Kills one rank's process (exit code 9, no cleanup) at a given batch of a given epoch."""

    def __init__(self, rank: int, epoch: int, batch: int) -> None:
        self.rank, self.epoch, self.batch = rank, epoch, batch

    def on_train_batch_end(self, trainer: L.Trainer, module: Any, outputs: Any, batch: Any, idx: int) -> None:
        if trainer.global_rank == self.rank and trainer.current_epoch == self.epoch and idx == self.batch:
            print(f"rank {self.rank} killed in epoch {self.epoch}", file=sys.stderr, flush=True)
            os._exit(9)


class ProcessedBatches(Callback):
    """Sums the batches this rank really trained on, and saves the replica when fit is interrupted."""

    def __init__(self, out: Path, signal_rank: int | None = None, signal_batch: int = 8) -> None:
        self.out, self.signal_rank, self.signal_batch = out, signal_rank, signal_batch
        self.total: torch.Tensor | None = None
        self.batches = 0  # this rank's own (global_step counts every rank's batches)

    def on_train_batch_end(self, trainer: L.Trainer, module: Any, outputs: Any, batch: Any, idx: int) -> None:
        (x,) = batch
        self.total = x.sum(dim=0) if self.total is None else self.total + x.sum(dim=0)
        self.batches += 1
        if trainer.global_rank == self.signal_rank and self.batches == self.signal_batch:
            os.kill(os.getpid(), signal.SIGTERM)

    def on_exception(self, trainer: L.Trainer, module: Any, exception: BaseException) -> None:
        torch.save({"state": _state(module), "total": self.total, "error": type(exception).__name__},
                   self.out / f"interrupted-rank{trainer.global_rank}.pt")


class ClaimLog(Callback):
    """Every epoch's batch indices this rank claimed (the claiming sampler's ``claimed``, read at the epoch's end)."""

    def __init__(self) -> None:
        self.epochs: list[list[int]] = []

    def on_train_epoch_end(self, trainer: L.Trainer, *args: Any) -> None:
        sampler = trainer.train_dataloader.batch_sampler
        self.epochs.append(list(getattr(sampler, "claimed", [])))


class OneCycleDigits(DigitsClassifier):
    """The OneCycleLR recipe of Lightning's docs: the schedule sized by ``trainer.estimated_stepping_batches``."""

    def __init__(self) -> None:
        super().__init__(sync_dist=True)
        self.total_steps: int | float | None = None

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
        self.total_steps = self.trainer.estimated_stepping_batches
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=int(self.total_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("test_acc", (self(x).argmax(dim=1) == y).float().mean(), sync_dist=True)


class StepRecord(Callback):
    """What every rank must agree on at consistent points: recorded after the epoch-end and validation points."""

    def __init__(self) -> None:
        self.points: list[tuple[Any, ...]] = []

    def _record(self, kind: str, trainer: L.Trainer) -> None:
        from lightning_pdasgd.integration import _lightning_internals as _internals

        (config,) = trainer.lr_scheduler_configs
        scheduler = config.scheduler
        self.points.append((kind, trainer.current_epoch, trainer.global_step, _internals.batches_that_stepped(trainer),
                            _internals.epoch_batches_ready(trainer), scheduler.last_epoch, scheduler._step_count,
                            tuple(scheduler.get_last_lr()), trainer.optimizers[0].param_groups[0]["lr"]))

    def on_train_epoch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self._record("epoch_end", trainer)

    def on_validation_start(self, trainer: L.Trainer, *args: Any) -> None:
        if not trainer.sanity_checking:
            self._record("validation", trainer)


def _accuracy(model: DigitsClassifier) -> float:
    """Accuracy on the whole validation set (Lightning's validation shards it across ranks)."""
    x, y = DigitsData().val_set.tensors
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(dim=1) == y).float().mean())


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of the module's state_dict (parameters and buffers)."""
    return {key: value.detach().clone() for key, value in module.state_dict().items()}


def _trainer(strategy: Any = None, devices: int = 2, **kwargs: Any) -> L.Trainer:
    """A quiet CPU Trainer on ``devices`` processes with PD-ASGD (default settings unless ``strategy`` is given)."""
    return L.Trainer(strategy=strategy or PDASGDStrategy(), **trainer_kwargs(devices=devices, **kwargs))


class SpikeOnRankOne(DigitsClassifier):
    """Rank 1's loss (and so its gradients) jumps 10x from its 30th batch (past the guard's warm-up of 20 losses, so
    the jump is a rise from a best the guard knows) until the divergence guard has recovered."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.local_batches = 0

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        self.local_batches += 1
        spiking = self.trainer.global_rank == 1 and self.local_batches >= 30
        return loss * 10 if spiking and self.trainer.strategy.stats.guard_trips == 0 else loss


CaseResult = tuple[L.Trainer, dict[str, Any]]
CaseFunction = Callable[..., CaseResult]  # (out, log, *args: str) -> (trainer, result)

CASES: dict[str, CaseFunction] = {}
"""Every case this worker runs, by the name the tests pass as its first argument."""


def case(name: str) -> Callable[[CaseFunction], CaseFunction]:
    """Registers the decorated function in :data:`CASES` under ``name``."""

    def register(function: CaseFunction) -> CaseFunction:
        assert name not in CASES, f"case {name!r} registered twice"
        CASES[name] = function
        return function

    return register


@case("learn")
def learn(out: Path, log: BatchLog) -> CaseResult:
    """Two ranks learn the digits; saves ``learn.ckpt`` for the resume case. Checks accuracy, bitwise-identical
    replicas and optimizer states, ``sync_dist`` metrics, and that every epoch's batches were each used once."""
    L.seed_everything(0)
    # the default replica_merge="mean" counts each rank's updates 1/2, as DDP's averaged gradient would; the lr is
    # the one the sum merge needed (half the single-device test's), kept so the runs stay comparable across releases
    model = DigitsClassifier(optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9), sync_dist=True)
    trainer = _trainer(strategy=PDASGDStrategy(metrics="full"), max_epochs=LEARN_EPOCHS, callbacks=[log])
    trainer.fit(model, DigitsData(batch_size=32))
    trainer.save_checkpoint(out / "learn.ckpt")
    metrics = {key: float(value) for key, value in trainer.callback_metrics.items()}
    return trainer, dict(accuracy=_accuracy(model), state=_state(model), optimizer=trainer.optimizers[0].state_dict(),
                         metrics=metrics, val_accuracy=model.val_accuracy)


@case("first_epoch")
def first_epoch(out: Path, log: BatchLog, method: str, *seeds: str) -> CaseResult:
    """The digits MLP after one epoch on two ranks, per seed: ``method`` is ``ddp`` (Lightning's DDP) or a
    ``replica_merge`` of PD-ASGD's default settings. Checks how much the exchange's delay costs early learning."""
    accuracies = []
    trainer: Any = None
    for seed in seeds:
        L.seed_everything(int(seed))
        model = DigitsClassifier(optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9), hidden=128)
        strategy = "ddp" if method == "ddp" else PDASGDStrategy(replica_merge=method)
        trainer = L.Trainer(strategy=strategy, **trainer_kwargs(devices=2, max_epochs=1, limit_val_batches=0))
        trainer.fit(model, DigitsData(batch_size=32))
        accuracies.append(_accuracy(model))
    return trainer, dict(accuracies=accuracies)


@case("linear")
def linear(out: Path, log: BatchLog, batches: str, *options: str) -> CaseResult:
    """LinearLoss on ``batches`` integer batches (options: ``tqdm``, TQDM's progress bar instead of Rich's; ``sum``,
    ``replica_merge="sum"``). Checks no update lost or doubled across ranks (weights are exactly -lr times all
    batches, over the ranks under the default mean), each batch claimed once, and the progress bar's estimated
    total; also the workload of the torchrun launch test."""
    width = 256
    model = LinearLoss(width)
    bar_total = BarTotal()
    callbacks: list[Callback] = [log, bar_total]
    if "tqdm" in options:  # Lightning picks Rich when it is installed
        from lightning.pytorch.callbacks import TQDMProgressBar

        callbacks.append(TQDMProgressBar())
    strategy = PDASGDStrategy(replica_merge=_merge(options))
    trainer = _trainer(strategy=strategy, max_epochs=1, callbacks=callbacks, enable_progress_bar=True)
    loader = integer_batches(int(batches), width)
    trainer.fit(model, loader)
    sampler = trainer.train_dataloader.batch_sampler
    return trainer, dict(state=_state(model), claimed=list(getattr(sampler, "claimed", [])), lr=LR,
                         bar_total=bar_total.total, merge=_merge(options))


def _merge(options: tuple[str, ...]) -> str:
    """The case's ``replica_merge``: ``sum`` among its options, else the default."""
    return "sum" if "sum" in options else "mean"


@case("straggler")
def straggler(out: Path, log: BatchLog, factor: str) -> CaseResult:
    """Rank 1 slowed by ``factor`` (0: no straggler) and held until rank 0 trained 20 batches. Checks that the fast
    rank never waits for the slow one and takes over more of the epoch, with the same total of batches."""
    slowdown = float(factor)
    L.seed_everything(0)
    model = DigitsClassifier(hidden=256)
    callbacks: list[Callback] = [log] + ([Straggler(rank=1, factor=slowdown)] if slowdown > 0 else [])
    if slowdown > 0:
        callbacks.append(HoldUntilOtherRankTrains(batches=20))
    trainer = _trainer(max_epochs=3, limit_val_batches=0, callbacks=callbacks)
    trainer.fit(model, DigitsData(batch_size=16))
    return trainer, {}


@case("preempt")
def preempt(out: Path, log: BatchLog, signal_rank: str, phase: str) -> CaseResult:
    """``start``: SIGTERM on rank ``signal_rank`` mid-epoch; ``resume``: go on from the hpc checkpoint. Checks that
    every rank drains, the replicas merge into one checkpoint with exactly the processed batches, and resume runs."""
    rank, resuming = int(signal_rank), phase == "resume"
    batches = ProcessedBatches(out, signal_rank=None if resuming else rank)
    model = LinearLoss(256)
    trainer = _trainer(max_epochs=2, callbacks=[log, batches], default_root_dir=out)
    trainer.fit(model, integer_batches(150, 256), ckpt_path="hpc" if resuming else None)
    return trainer, dict(state=_state(model), total=batches.total, lr=LR)


@case("elastic")
def elastic(out: Path, log: BatchLog) -> CaseResult:
    """Under torchrun --max-restarts: rank 1 dies in epoch 2 on the first attempt. Checks that the restarted job
    resumes from the last epoch-end checkpoint (``last.ckpt``) and finishes with identical, accurate replicas."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    checkpoints = out / "checkpoints"
    last = checkpoints / "last.ckpt"
    resume_from = str(last) if last.exists() else None
    L.seed_everything(0)
    model = DigitsClassifier(optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9), sync_dist=True)
    callbacks: list[Callback] = [log, ModelCheckpoint(dirpath=checkpoints, save_last=True)]
    if attempt == 0:
        callbacks.append(DieInEpoch(rank=1, epoch=2, batch=5))
    trainer = _trainer(max_epochs=8, callbacks=callbacks, enable_checkpointing=True)
    trainer.fit(model, DigitsData(batch_size=32), ckpt_path=resume_from)
    return trainer, dict(accuracy=_accuracy(model), attempt=attempt, resumed_from=resume_from,
                         val_accuracy=model.val_accuracy)


def _fail_on_rank(rank: str, hard: bool) -> CaseResult:
    """Trains until ``rank`` fails at batch 5 (raises, or with ``hard`` exits without cleanup); never returns."""
    model = DigitsClassifier()
    failure = FailOnRank(rank=int(rank), batch=5, hard=hard)
    trainer = _trainer(strategy=PDASGDStrategy(wait_timeout=60), max_epochs=50, callbacks=[failure])
    trainer.fit(model, DigitsData(batch_size=16))
    return trainer, {}


@case("fail")
def fail(out: Path, log: BatchLog, rank: str) -> CaseResult:
    """Rank ``rank`` raises mid-epoch. Checks that every rank stops quickly with an error and none finishes fit."""
    return _fail_on_rank(rank, hard=False)


@case("die")
def die(out: Path, log: BatchLog, rank: str) -> CaseResult:
    """Rank ``rank``'s process exits without any cleanup. Checks that the other rank is not left waiting."""
    return _fail_on_rank(rank, hard=True)


@case("steps")
def steps(out: Path, log: BatchLog, factor: str, max_steps: str) -> CaseResult:
    """Lightning's docs recipes on 2 ranks: OneCycleLR sized by ``estimated_stepping_batches``, ModelCheckpoint on
    val_acc (best and last), then ``trainer.test(ckpt_path="best")`` on every rank; rank 1 slowed by ``factor``,
    and ``max_steps`` > 0 adds ``limit_train_batches=0.5``. Checks one step count, schedule and checkpoint set on
    every rank, counted over the batches of all ranks."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    slowdown, step_limit = float(factor), int(max_steps)
    L.seed_everything(0)
    model = OneCycleDigits()
    record = StepRecord()
    checkpoint = ModelCheckpoint(dirpath=out / "checkpoints", monitor="val_acc", mode="max", save_top_k=2,
                                 save_last=True)
    callbacks = [log, record, checkpoint] + ([Straggler(rank=1, factor=slowdown)] if slowdown > 0 else [])
    limits: dict[str, Any] = dict(max_epochs=3)
    if step_limit > 0:  # max_steps and a fractional epoch: both count the batches of all ranks together
        limits = dict(max_steps=step_limit, limit_train_batches=0.5)
    trainer = _trainer(callbacks=callbacks, enable_checkpointing=True, **limits)
    trainer.fit(model, DigitsData(batch_size=32))
    (config,) = trainer.lr_scheduler_configs
    sampler = trainer.train_dataloader.batch_sampler
    result = dict(points=record.points, total_steps=model.total_steps, claimed=list(sampler.claimed),
                  final_lr=trainer.optimizers[0].param_groups[0]["lr"], last_epoch=config.scheduler.last_epoch,
                  best=checkpoint.best_model_path, last=checkpoint.last_model_path,
                  files=sorted(path.name for path in (out / "checkpoints").iterdir()),
                  limit_train_batches=trainer.limit_train_batches, fit_global_step=trainer.global_step,
                  fit_epoch=trainer.current_epoch, state=_state(model))
    test_loader = DigitsData().val_dataloader()
    tested = trainer.test(model, test_loader, ckpt_path="best", verbose=False)
    result.update(test_acc=tested[0]["test_acc"], tested_path=trainer.ckpt_path)
    return trainer, result


@case("guard")
def guard(out: Path, log: BatchLog) -> CaseResult:
    """Rank 1's loss jumps 10x (SpikeOnRankOne). Checks that the divergence guard trips once on both ranks together,
    restores the same state, and the replicas end bitwise identical and accurate."""
    L.seed_everything(0)
    model = SpikeOnRankOne(optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9), sync_dist=True)
    # the recovery happens at the epoch's end and restores the state of its start: epochs to catch up after
    trainer = _trainer(max_epochs=8, callbacks=[log])
    trainer.fit(model, DigitsData(batch_size=32))
    return trainer, dict(accuracy=_accuracy(model), state=_state(model), trips=trainer.strategy.stats.guard_trips,
                         val_accuracy=model.val_accuracy)


@case("resume")
def resume(out: Path, log: BatchLog, devices: str, ckpt: str) -> CaseResult:
    """Resumes the 2-rank ``learn`` checkpoint ``ckpt`` on ``devices`` processes for two more epochs. Checks that it
    goes on from all ranks' step count, trains every remaining batch once, and stays accurate."""
    L.seed_everything(1)
    model = DigitsClassifier(optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9))
    trainer = _trainer(devices=int(devices), max_epochs=LEARN_EPOCHS + 2, callbacks=[log])
    trainer.fit(model, DigitsData(batch_size=32), ckpt_path=ckpt)
    return trainer, dict(accuracy=_accuracy(model), state=_state(model))


@case("nodes")
def nodes(out: Path, log: BatchLog, devices: str, num_nodes: str) -> CaseResult:
    """The ``learn`` workload on ``Trainer(devices=devices, num_nodes=num_nodes)`` in processes someone else started
    (several torchrun "nodes", or SLURM's tasks; ``tests/test_multinode.py``). Checks the cluster environment
    Lightning picked, the accuracy bar, bitwise-identical replicas and optimizer states, and that every epoch's
    batches were each claimed exactly once across all nodes."""
    L.seed_everything(0)
    model = DigitsClassifier(optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9), sync_dist=True)
    claims = ClaimLog()
    # default_root_dir: under SLURM Lightning resumes by itself from any hpc_ckpt_*.ckpt there (the working folder)
    trainer = _trainer(devices=int(devices), num_nodes=int(num_nodes), max_epochs=LEARN_EPOCHS, callbacks=[log, claims],
                       default_root_dir=out)
    trainer.fit(model, DigitsData(batch_size=32))
    environment = trainer.strategy.cluster_environment
    return trainer, dict(accuracy=_accuracy(model), state=_state(model), optimizer=trainer.optimizers[0].state_dict(),
                         val_accuracy=model.val_accuracy, claimed=claims.epochs,
                         cluster_environment=type(environment).__name__, main_address=environment.main_address,
                         main_port=environment.main_port, world_size=trainer.world_size,
                         node_rank=trainer.node_rank, local_rank=trainer.local_rank, num_nodes=trainer.num_nodes,
                         pid=os.getpid())


@case("checkpointed")
def checkpointed(out: Path, log: BatchLog) -> CaseResult:
    """The digits MLP with its first block under ``torch.utils.checkpoint`` (non-reentrant), default settings, two
    ranks. Checks that a recomputation on a backward thread is never taken for a changed parameter set (a rebuild on
    one rank only met the other's validation point) and that the replicas learn and end identical."""
    L.seed_everything(0)
    model = CheckpointedDigits(False, optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9))
    trainer = _trainer(max_epochs=3, callbacks=[log])
    trainer.fit(model, DigitsData(batch_size=32))
    return trainer, dict(accuracy=_accuracy(model), state=_state(model), optimizer=trainer.optimizers[0].state_dict())


@case("clipped")
def clipped(out: Path, log: BatchLog) -> CaseResult:
    """The digits MLP with ``gradient_clip_val`` (by norm), default settings, two ranks: each rank clips its own
    backwards bucket by bucket (``engine/norm_clipping.py``) while the exchange merges the replicas."""
    seen: dict[str, Any] = {}

    class EngineAtTheEnd(L.Callback):
        def on_train_epoch_end(self, trainer: L.Trainer, *args: Any) -> None:
            strategy = trainer.strategy
            seen.update(clip_norm=strategy.updater.clip_norm, layerwise=strategy.updater.layerwise,
                        in_flight=strategy.engine.max_in_flight)

    L.seed_everything(0)
    model = DigitsClassifier(optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9))
    trainer = _trainer(max_epochs=3, callbacks=[log, EngineAtTheEnd()], gradient_clip_val=0.5)
    trainer.fit(model, DigitsData(batch_size=32))
    return trainer, dict(accuracy=_accuracy(model), state=_state(model), optimizer=trainer.optimizers[0].state_dict(),
                         **seen)


@case("synchronous")
def synchronous(out: Path, log: BatchLog, batches: str, *options: str) -> CaseResult:
    """Lightning's own step (``max_in_flight=1``) on each rank while the exchange merges in the background. Checks,
    as ``linear``, that no update is lost or doubled (no merge lands inside a step) and every batch is claimed once."""
    width = 256
    os.environ.pop("PDASGD_ENGINE_AT_ONE_IN_FLIGHT", None)  # the users' max_in_flight=1, not the engine's test mode
    trainer = _trainer(strategy=PDASGDStrategy(max_in_flight=1, replica_merge=_merge(options)), max_epochs=1,
                       callbacks=[log])
    model = LinearLoss(width)
    trainer.fit(model, integer_batches(int(batches), width))
    sampler = trainer.train_dataloader.batch_sampler
    return trainer, dict(state=_state(model), claimed=list(getattr(sampler, "claimed", [])), lr=LR,
                         engine_updates=trainer.strategy.stats.total_updates, merge=_merge(options))


def main(name: str, out: Path, *args: str) -> None:
    """Runs the case ``name`` on this rank and saves its result to ``out/{name}-rank{R}.pt``."""
    out.mkdir(parents=True, exist_ok=True)
    if name not in CASES:
        raise SystemExit(f"unknown case {name!r}")
    log = BatchLog()
    trainer, result = CASES[name](out, log, *args)
    result.update(batches=log.batches, train_seconds=log.train_seconds, global_step=trainer.global_step,
                  rank=trainer.global_rank)
    torch.save(result, out / f"{name}-rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), *sys.argv[3:])
