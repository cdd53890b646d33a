"""One rank of a real multi-process run (gloo on CPU), launched by Lightning's own subprocess launcher.

Run as ``python tests/distributed_worker.py CASE OUT_DIR [ARGS...]``: Lightning re-runs this script for every
other local rank. Each rank writes what the test needs to ``OUT_DIR/CASE-rank{R}.pt``.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402

from lightning_pdasgd import PDASGDStrategy, Straggler  # noqa: E402
from tests.helpers import trainer_kwargs  # noqa: E402
from tests.models import DigitsClassifier, DigitsData  # noqa: E402
from tests.test_concurrency import LR, LinearLoss, _integer_batches  # noqa: E402


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
    return {key: value.detach().clone() for key, value in module.state_dict().items()}


def _trainer(strategy: Any = None, devices: int = 2, **kwargs: Any) -> L.Trainer:
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


def main(case: str, out: Path, *args: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    log = BatchLog()
    result: dict[str, Any] = {}
    if case == "learn":
        L.seed_everything(0)
        # every rank's updates are applied to every replica: half the single-device test's lr keeps the same
        # per-sample step while staleness (two engines plus the exchange) roughly doubles
        model = DigitsClassifier(optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9), sync_dist=True)
        trainer = _trainer(strategy=PDASGDStrategy(metrics="full"), max_epochs=8, callbacks=[log])
        trainer.fit(model, DigitsData(batch_size=32))
        trainer.save_checkpoint(out / "learn.ckpt")
        metrics = {key: float(value) for key, value in trainer.callback_metrics.items()}
        result.update(accuracy=_accuracy(model), state=_state(model), optimizer=trainer.optimizers[0].state_dict(),
                      metrics=metrics, val_accuracy=model.val_accuracy)
    elif case == "linear":
        width, batches = 256, int(args[0])
        model = LinearLoss(width)
        bar_total = BarTotal()
        callbacks = [log, bar_total]
        if args[1:] == ("tqdm",):  # Lightning picks Rich when it is installed
            from lightning.pytorch.callbacks import TQDMProgressBar

            callbacks.append(TQDMProgressBar())
        trainer = _trainer(max_epochs=1, callbacks=callbacks, enable_progress_bar=True)
        loader = _integer_batches(batches, width)
        trainer.fit(model, loader)
        sampler = trainer.train_dataloader.batch_sampler
        result.update(state=_state(model), claimed=list(getattr(sampler, "claimed", [])), lr=LR,
                      bar_total=bar_total.total)
    elif case == "straggler":
        factor = float(args[0])
        L.seed_everything(0)
        model = DigitsClassifier(hidden=256)
        callbacks: list[Callback] = [log] + ([Straggler(rank=1, factor=factor)] if factor > 0 else [])
        if factor > 0:
            callbacks.append(HoldUntilOtherRankTrains(batches=20))
        trainer = _trainer(max_epochs=3, limit_val_batches=0, callbacks=callbacks)
        trainer.fit(model, DigitsData(batch_size=16))
    elif case == "preempt":
        signal_rank, resume = int(args[0]), args[1] == "resume"
        batches = ProcessedBatches(out, signal_rank=None if resume else signal_rank)
        model = LinearLoss(256)
        trainer = _trainer(max_epochs=2, callbacks=[log, batches], default_root_dir=out)
        trainer.fit(model, _integer_batches(150, 256), ckpt_path="hpc" if resume else None)
        result.update(state=_state(model), total=batches.total, lr=LR)
    elif case == "elastic":
        # torchrun --max-restarts: rank 1 dies mid-epoch on the first attempt; the restarted job resumes from the
        # last epoch-end checkpoint and finishes
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
        result.update(accuracy=_accuracy(model), attempt=attempt, resumed_from=resume_from,
                      val_accuracy=model.val_accuracy)
    elif case in ("fail", "die"):
        model = DigitsClassifier()
        failure = FailOnRank(rank=int(args[0]), batch=5, hard=case == "die")
        trainer = _trainer(strategy=PDASGDStrategy(wait_timeout=60), max_epochs=50, callbacks=[failure])
        trainer.fit(model, DigitsData(batch_size=16))
    elif case == "steps":
        # the recipes of Lightning's docs on 2 ranks: OneCycleLR sized by estimated_stepping_batches, ModelCheckpoint
        # on a validation metric (best and last), then `trainer.test(ckpt_path="best")` on every rank
        from lightning.pytorch.callbacks import ModelCheckpoint

        factor, max_steps = float(args[0]), int(args[1])
        L.seed_everything(0)
        model = OneCycleDigits()
        record = StepRecord()
        checkpoint = ModelCheckpoint(dirpath=out / "checkpoints", monitor="val_acc", mode="max", save_top_k=2,
                                     save_last=True)
        callbacks = [log, record, checkpoint] + ([Straggler(rank=1, factor=factor)] if factor > 0 else [])
        limits: dict[str, Any] = dict(max_epochs=3)
        if max_steps > 0:  # max_steps and a fractional epoch: both count the batches of all ranks together
            limits = dict(max_steps=max_steps, limit_train_batches=0.5)
        trainer = _trainer(callbacks=callbacks, enable_checkpointing=True, **limits)
        trainer.fit(model, DigitsData(batch_size=32))
        (config,) = trainer.lr_scheduler_configs
        sampler = trainer.train_dataloader.batch_sampler
        result.update(points=record.points, total_steps=model.total_steps, claimed=list(sampler.claimed),
                      final_lr=trainer.optimizers[0].param_groups[0]["lr"], last_epoch=config.scheduler.last_epoch,
                      best=checkpoint.best_model_path, last=checkpoint.last_model_path,
                      files=sorted(path.name for path in (out / "checkpoints").iterdir()),
                      limit_train_batches=trainer.limit_train_batches, fit_global_step=trainer.global_step,
                      fit_epoch=trainer.current_epoch, state=_state(model))
        test_loader = DigitsData().val_dataloader()
        tested = trainer.test(model, test_loader, ckpt_path="best", verbose=False)
        result.update(test_acc=tested[0]["test_acc"], tested_path=trainer.ckpt_path)
    elif case == "guard":
        L.seed_everything(0)
        model = SpikeOnRankOne(optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9), sync_dist=True)
        # the recovery happens at the epoch's end and restores the state of its start: epochs to catch up after
        trainer = _trainer(max_epochs=8, callbacks=[log])
        trainer.fit(model, DigitsData(batch_size=32))
        result.update(accuracy=_accuracy(model), state=_state(model), trips=trainer.strategy.stats.guard_trips,
                      val_accuracy=model.val_accuracy)
    elif case == "resume":
        devices, ckpt = int(args[0]), args[1]
        L.seed_everything(1)
        model = DigitsClassifier(optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9))
        trainer = _trainer(devices=devices, max_epochs=10, callbacks=[log])
        trainer.fit(model, DigitsData(batch_size=32), ckpt_path=ckpt)
        result.update(accuracy=_accuracy(model), state=_state(model))
    else:
        raise SystemExit(f"unknown case {case!r}")
    result.update(batches=log.batches, train_seconds=log.train_seconds, global_step=trainer.global_step,
                  rank=trainer.global_rank)
    torch.save(result, out / f"{case}-rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), *sys.argv[3:])
