"""Compatibility matrix (issue #12): every built-in Lightning callback and tuner feature, plain vs ``pdasgd``.

Each row runs the same seeded fit on the digits twice, under ``strategy="auto"`` and under PD-ASGD, and asserts
one of two outcomes: the feature's observable effect is the same as plain (within the tolerance the row states;
with ``max_in_flight=1`` PD-ASGD must reproduce plain Lightning, so those rows compare weights to 1e-5), or the
strategy refuses it at setup with a MisconfigurationException naming the feature. Each row writes its verdict
(same / refused / DIFFERENT, with the numbers) to a JSON file (``$PDASGD_COMPAT_JSON`` or pytest's tmp dir);
``python tools/compat_table.py FILE`` renders it as the README's table.

Abstract bases in ``lightning.pytorch.callbacks.__all__`` (Callback, Checkpoint, ProgressBar) are no rows: their
built-in subclasses are.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.fabric.utilities.spike import TrainingSpikeException
from lightning.pytorch import callbacks as cb
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.tuner import Tuner

from lightning_pdasgd import PDASGDStrategy
from tests.compat_helpers import (
    RESULTS_ENV,
    MatrixNet,
    Row,
    accuracy,
    fit,
    max_difference,
    snapshot,
    write_row,
)
from tests.models import DigitsData

EXACT = 1e-5  # max_in_flight=1 rows: float32 weights, same operations, summed in a different order at most
ACCURACY = 0.06  # default-strategy rows: stale gradients change the trajectory, not the result
WAIT = 60.0  # wait_timeout: a row that deadlocks the engine fails in a minute with an error naming the wait
ONE = "PDASGDStrategy(max_in_flight=1)"
DEFAULT = "PDASGDStrategy() (default settings)"


def one_in_flight(wait_timeout: float = WAIT) -> PDASGDStrategy:
    return PDASGDStrategy(max_in_flight=1, wait_timeout=wait_timeout)


def default() -> PDASGDStrategy:
    return PDASGDStrategy(wait_timeout=WAIT)


@pytest.fixture
def matrix(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Row]]:
    """Makes the test's row; writes it to the results file when the test ends, whatever its verdict."""
    rows: list[Row] = []

    def make(feature: str, outcome: str, strategy: str) -> Row:
        row = Row(feature=feature, outcome=outcome, strategy=strategy)
        rows.append(row)
        return row

    yield make
    path = Path(os.environ.get(RESULTS_ENV) or tmp_path_factory.getbasetemp() / "compat_matrix.json")
    for row in rows:
        write_row(path, row)


def run_pdasgd(row: Row, run: Callable[[], Any]) -> Any:
    """Run the pdasgd side; a failure is recorded in the row before it propagates."""
    try:
        return run()
    except BaseException as error:
        row.pdasgd_failed(error)
        raise


def compare_weights(row: Row, plain: torch.nn.Module, pdasgd: torch.nn.Module, tolerance: float = EXACT) -> None:
    row.compare("max |weight difference|", 0.0, max_difference(snapshot(plain), snapshot(pdasgd)), tolerance)


def compare_accuracy(row: Row, plain: torch.nn.Module, pdasgd: torch.nn.Module, tolerance: float) -> None:
    row.compare("validation accuracy", accuracy(plain), accuracy(pdasgd), tolerance)


def csv_metrics(root: Path) -> list[dict[str, str]]:
    (path,) = root.rglob("metrics.csv")
    with open(path) as handle:
        return list(csv.DictReader(handle))


# ------------------------------------------------------------------------------------------- checkpoints, stopping
def test_model_checkpoint(matrix: Callable[..., Row], tmp_path: Path) -> None:
    row = matrix("ModelCheckpoint", "files written, best score, best checkpoint's weights", ONE)

    def run(strategy: Any, name: str) -> tuple[cb.ModelCheckpoint, L.Trainer]:
        callback = cb.ModelCheckpoint(
            dirpath=tmp_path / name,
            monitor="val_acc",
            mode="max",
            save_top_k=2,
            save_last=True,
            filename="{epoch}-{step}",
        )
        _, trainer = fit(strategy, callbacks=[callback], enable_checkpointing=True)
        return callback, trainer

    plain, _ = run("auto", "plain")
    pdasgd, _ = run_pdasgd(row, lambda: run(one_in_flight(), "pdasgd"))
    files = lambda name: sorted(path.name for path in (tmp_path / name).iterdir())
    row.compare("files", files("plain"), files("pdasgd"))
    row.compare("best val_acc", float(plain.best_model_score), float(pdasgd.best_model_score), EXACT)
    best = [
        torch.load(path, weights_only=True)["state_dict"] for path in (plain.best_model_path, pdasgd.best_model_path)
    ]
    row.compare("best checkpoint max |weight difference|", 0.0, max_difference(*best), EXACT)
    row.finish()


def test_on_exception_checkpoint(matrix: Callable[..., Row], tmp_path: Path) -> None:
    row = matrix("OnExceptionCheckpoint", "checkpoint written on an error at step 13: its global_step and weights", ONE)

    class FailsAtStep13(MatrixNet):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            if self.trainer.global_step == 13:
                raise RuntimeError("planted failure")
            return super().training_step(batch, batch_idx)

    def run(strategy: Any, name: str) -> dict[str, Any]:
        callback = cb.OnExceptionCheckpoint(dirpath=tmp_path / name, filename="on_exception")
        with pytest.raises(RuntimeError, match="planted failure"):
            fit(strategy, model_factory=FailsAtStep13, callbacks=[callback], enable_checkpointing=True)
        return torch.load(tmp_path / name / "on_exception.ckpt", weights_only=False)

    plain = run("auto", "plain")
    pdasgd = run_pdasgd(row, lambda: run(one_in_flight(), "pdasgd"))
    row.compare("global_step", plain["global_step"], pdasgd["global_step"])
    row.compare("max |weight difference|", 0.0, max_difference(plain["state_dict"], pdasgd["state_dict"]), EXACT)
    row.finish()


def test_early_stopping(matrix: Callable[..., Row]) -> None:
    row = matrix("EarlyStopping", "epoch at which val_acc >= 0.75 stops the fit; weights then", ONE)

    def run(strategy: Any) -> tuple[torch.nn.Module, L.Trainer, cb.EarlyStopping]:
        callback = cb.EarlyStopping(monitor="val_acc", mode="max", stopping_threshold=0.75, patience=100)
        model, trainer = fit(strategy, callbacks=[callback], epochs=8, batches=6)
        return model, trainer, callback

    plain_model, plain, plain_cb = run("auto")
    pdasgd_model, pdasgd, pdasgd_cb = run_pdasgd(row, lambda: run(one_in_flight()))
    row.compare("stopped_epoch", plain_cb.stopped_epoch, pdasgd_cb.stopped_epoch)
    row.require("plain stopped before max_epochs", plain_cb.stopped_epoch, 0 < plain_cb.stopped_epoch < 7)
    row.compare("global_step", plain.global_step, pdasgd.global_step)
    compare_weights(row, plain_model, pdasgd_model)
    row.finish()


def test_timer(matrix: Callable[..., Row]) -> None:
    row = matrix("Timer", "a 1 us budget stops the fit after the first step; weights then", ONE)

    def run(strategy: Any) -> tuple[torch.nn.Module, L.Trainer, cb.Timer]:
        timer = cb.Timer(duration=timedelta(microseconds=1), interval="step")
        model, trainer = fit(strategy, callbacks=[timer])
        return model, trainer, timer

    plain_model, plain, _ = run("auto")
    pdasgd_model, pdasgd, timer = run_pdasgd(row, lambda: run(one_in_flight()))
    row.compare("global_step", plain.global_step, pdasgd.global_step)
    row.require("time_elapsed('train') > 0", timer.time_elapsed("train"), timer.time_elapsed("train") > 0)
    compare_weights(row, plain_model, pdasgd_model)
    row.finish()


# ------------------------------------------------------------------------------------------- logging, monitors
def test_learning_rate_monitor(matrix: Callable[..., Row], tmp_path: Path) -> None:
    row = matrix("LearningRateMonitor", "lr logged at every step under a StepLR schedule", DEFAULT)
    factory = lambda: MatrixNet(scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, 7, 0.5))

    def run(strategy: Any, name: str) -> list[str]:
        logger = CSVLogger(tmp_path / name)
        fit(
            strategy,
            model_factory=factory,
            callbacks=[cb.LearningRateMonitor("step")],
            logger=logger,
            log_every_n_steps=1,
        )
        return [line["lr-SGD"] for line in csv_metrics(tmp_path / name) if line.get("lr-SGD")]

    plain = run("auto", "plain")
    pdasgd = run_pdasgd(row, lambda: run(default(), "pdasgd"))
    row.compare("logged lr values", plain, pdasgd)
    row.require("the schedule changed the lr", len(set(plain)), len(set(plain)) > 1)
    row.finish()


def test_throughput_monitor(matrix: Callable[..., Row], tmp_path: Path) -> None:
    row = matrix("ThroughputMonitor", "metric names logged and the samples counted", DEFAULT)
    PREFIXES = ("train/", "validate/")

    def run(strategy: Any, name: str) -> tuple[list[str], list[str]]:
        monitor = cb.ThroughputMonitor(batch_size_fn=lambda batch: batch[0].size(0), window_size=4)
        fit(strategy, callbacks=[monitor], logger=CSVLogger(tmp_path / name), log_every_n_steps=1)
        lines = csv_metrics(tmp_path / name)
        keys = sorted({key for line in lines for key, value in line.items() if value and key.startswith(PREFIXES)})
        samples = [line["train/samples"] for line in lines if line.get("train/samples")]
        return keys, samples

    plain_keys, plain_samples = run("auto", "plain")
    pdasgd_keys, pdasgd_samples = run_pdasgd(row, lambda: run(default(), "pdasgd"))
    row.compare("throughput metric names", plain_keys, pdasgd_keys)
    row.compare("train/samples", plain_samples, pdasgd_samples)
    row.require("train/samples logged", len(pdasgd_samples), len(pdasgd_samples) == 30)
    row.finish()


def test_device_stats_monitor(matrix: Callable[..., Row], tmp_path: Path) -> None:
    pytest.importorskip("psutil")  # DeviceStatsMonitor's CPU stats need it (in the dev extras)
    row = matrix("DeviceStatsMonitor", "device metric names logged", DEFAULT)

    def run(strategy: Any, name: str) -> list[str]:
        fit(
            strategy,
            callbacks=[cb.DeviceStatsMonitor(cpu_stats=True)],
            logger=CSVLogger(tmp_path / name),
            log_every_n_steps=1,
        )
        return sorted(
            {key for line in csv_metrics(tmp_path / name) for key, value in line.items() if value and "cpu_" in key}
        )

    plain = run("auto", "plain")
    pdasgd = run_pdasgd(row, lambda: run(default(), "pdasgd"))
    row.compare("device metric names", plain, pdasgd)
    row.require("some were logged", len(pdasgd), len(pdasgd) > 0)
    row.finish()


def test_spike_detection(matrix: Callable[..., Row], tmp_path: Path) -> None:
    row = matrix("SpikeDetection", "a planted 1000x loss spike at batch 6 is detected at the same batch", ONE)

    class Spiky(MatrixNet):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            loss = super().training_step(batch, batch_idx)
            return loss * 1000 if self.trainer.global_step == 6 else loss

    def run(strategy: Any, name: str) -> str:
        path = tmp_path / f"{name}.json"
        with pytest.raises(TrainingSpikeException) as caught:
            fit(strategy, model_factory=Spiky, callbacks=[cb.SpikeDetection(exclude_batches_path=path)])
        return str(caught.value)

    plain = run("auto", "plain")
    pdasgd = run_pdasgd(row, lambda: run(one_in_flight(), "pdasgd"))
    row.compare("exception", plain, pdasgd)
    row.compare("excluded batches file", (tmp_path / "plain.json").read_text(), (tmp_path / "pdasgd.json").read_text())
    row.finish()


def test_lambda_callback(matrix: Callable[..., Row]) -> None:
    row = matrix("LambdaCallback", "weights seen by on_train_epoch_end; steps seen by on_train_batch_end", ONE)

    def run(strategy: Any) -> tuple[list[float], list[int]]:
        norms: list[float] = []
        steps: list[int] = []
        callback = cb.LambdaCallback(
            on_train_epoch_end=lambda trainer, module: norms.append(float(module.head.weight.detach().norm())),
            on_train_batch_end=lambda trainer, *args: steps.append(trainer.global_step),
        )
        fit(strategy, callbacks=[callback])
        return norms, steps

    plain_norms, plain_steps = run("auto")
    pdasgd_norms, pdasgd_steps = run_pdasgd(row, lambda: run(one_in_flight()))
    row.compare("global_step at each batch end", plain_steps, pdasgd_steps)
    for epoch, (plain, pdasgd) in enumerate(zip(plain_norms, pdasgd_norms)):
        row.compare(f"head weight norm at epoch {epoch} end", plain, pdasgd, EXACT)
    row.compare("epoch ends seen", len(plain_norms), len(pdasgd_norms))
    row.finish()


# ------------------------------------------------------------------------------------------- progress bars, summaries
@pytest.mark.parametrize("bar_class", [cb.TQDMProgressBar, cb.RichProgressBar], ids=["tqdm", "rich"])
def test_progress_bar(matrix: Callable[..., Row], bar_class: type) -> None:
    row = matrix(bar_class.__name__, "batches shown per epoch, val_acc on the bar, weights after fit", ONE)

    def run(strategy: Any) -> tuple[torch.nn.Module, Any, L.Trainer]:
        bar = bar_class()
        model, trainer = fit(strategy, callbacks=[bar], enable_progress_bar=True)
        return model, bar, trainer

    plain_model, plain_bar, _plain = run("auto")
    pdasgd_model, pdasgd_bar, pdasgd = run_pdasgd(row, lambda: run(one_in_flight()))
    row.compare("total_train_batches", plain_bar.total_train_batches, pdasgd_bar.total_train_batches)
    row.require("val_acc on the bar", sorted(pdasgd.progress_bar_metrics), "val_acc" in pdasgd.progress_bar_metrics)
    compare_weights(row, plain_model, pdasgd_model)  # the bar's own hooks must not change training
    row.finish()


@pytest.mark.parametrize("summary_class", [cb.ModelSummary, cb.RichModelSummary], ids=["plain", "rich"])
def test_model_summary(matrix: Callable[..., Row], summary_class: type) -> None:
    row = matrix(summary_class.__name__, "layers, total and trainable parameter counts summarized", DEFAULT)
    seen: list[tuple[Any, ...]] = []

    class Recording(summary_class):  # type: ignore[misc, valid-type]
        @staticmethod
        def summarize(
            summary_data: Any, total_parameters: int, trainable_parameters: int, *args: Any, **kw: Any
        ) -> None:
            seen.append((summary_data[1][1], total_parameters, trainable_parameters))

    fit("auto", callbacks=[Recording()], enable_model_summary=True, epochs=1, batches=2)
    run_pdasgd(row, lambda: fit(default(), callbacks=[Recording()], enable_model_summary=True, epochs=1, batches=2))
    row.compare("summary (layer names, total, trainable)", list(seen[0]), list(seen[1]) if len(seen) > 1 else None)
    row.finish()


def test_prediction_writer(matrix: Callable[..., Row], tmp_path: Path) -> None:
    row = matrix("BasePredictionWriter", "predictions written per batch and per epoch after a fit", ONE)

    class Writer(cb.BasePredictionWriter):
        def __init__(self, directory: Path) -> None:
            super().__init__(write_interval="batch_and_epoch")
            self.directory = directory

        def write_on_batch_end(self, trainer: Any, module: Any, prediction: Any, indices: Any, *args: Any) -> None:
            torch.save(prediction, self.directory / f"batch_{args[1]}.pt")

        def write_on_epoch_end(self, trainer: Any, module: Any, predictions: Any, indices: Any) -> None:
            torch.save(predictions, self.directory / "epoch.pt")

    def run(strategy: Any, name: str) -> tuple[list[str], torch.Tensor]:
        directory = tmp_path / name
        directory.mkdir()
        model, trainer = fit(strategy, callbacks=[Writer(directory)])
        trainer.predict(model, dataloaders=DigitsData().val_dataloader(), return_predictions=False)
        return sorted(p.name for p in directory.iterdir()), torch.cat(torch.load(directory / "epoch.pt"))

    plain_files, plain = run("auto", "plain")
    pdasgd_files, pdasgd = run_pdasgd(row, lambda: run(one_in_flight(), "pdasgd"))
    row.compare("files", plain_files, pdasgd_files)
    row.compare("max |prediction difference|", 0.0, float((plain - pdasgd).abs().max()), EXACT)
    row.finish()


# ------------------------------------------------------------------------------------------- weight averaging
def _swa(row: Row, batch_norm: bool, wait_timeout: float = WAIT) -> None:
    factory = lambda: MatrixNet(batch_norm=batch_norm)

    def run(strategy: Any) -> tuple[torch.nn.Module, L.Trainer]:
        swa = cb.StochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=2)
        return fit(strategy, model_factory=factory, callbacks=[swa], epochs=4)

    plain_model, plain = run("auto")
    pdasgd_model, pdasgd = run_pdasgd(row, lambda: run(one_in_flight(wait_timeout)))
    row.compare("global_step", plain.global_step, pdasgd.global_step)
    compare_weights(row, plain_model, pdasgd_model)
    row.finish()


def test_stochastic_weight_averaging(matrix: Callable[..., Row]) -> None:
    _swa(matrix("StochasticWeightAveraging", "averaged weights after fit (SWA from epoch 2)", ONE), batch_norm=False)


def test_stochastic_weight_averaging_batch_norm(matrix: Callable[..., Row]) -> None:
    row = matrix(
        "StochasticWeightAveraging + BatchNorm", "averaged weights and the BatchNorm statistics epoch after fit", ONE
    )
    _swa(row, batch_norm=True, wait_timeout=5.0)  # a step takes milliseconds: 5 s without one is a deadlock



@pytest.mark.parametrize("averaging", ["EMAWeightAveraging", "WeightAveraging"])
def test_weight_averaging(matrix: Callable[..., Row], averaging: str) -> None:
    if not hasattr(cb, averaging):
        pytest.skip(f"{averaging} is not in this Lightning version")
    row = matrix(averaging, "averaged weights copied into the model at the end of fit", ONE)
    make = (lambda: cb.EMAWeightAveraging(decay=0.9)) if averaging == "EMAWeightAveraging" else cb.WeightAveraging

    plain_model, _ = fit("auto", callbacks=[make()])
    pdasgd_model, _ = run_pdasgd(row, lambda: fit(one_in_flight(), callbacks=[make()]))
    compare_weights(row, plain_model, pdasgd_model)
    row.finish()


# ------------------------------------------------------------------------------------------- parameter-set changes

def test_backbone_finetuning(matrix: Callable[..., Row]) -> None:
    row = matrix("BackboneFinetuning", "backbone frozen for epoch 0, unfrozen at epoch 1: final weights", ONE)

    def run(strategy: Any) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
        L.seed_everything(7, verbose=False)
        start = snapshot(MatrixNet())
        model, _ = fit(strategy, callbacks=[cb.BackboneFinetuning(unfreeze_backbone_at_epoch=1)], epochs=3)
        return model, start

    plain_model, start = run("auto")
    pdasgd_model, _ = run_pdasgd(row, lambda: run(one_in_flight()))
    moved = (pdasgd_model.backbone[0].weight.detach() - start["backbone.0.weight"]).abs().max().item()
    row.require("backbone changed after unfreezing", moved, moved > 1e-4)
    compare_weights(row, plain_model, pdasgd_model)
    row.finish()


def test_base_finetuning(matrix: Callable[..., Row]) -> None:
    row = matrix("BaseFinetuning", "custom freeze/unfreeze_and_add_param_group at epoch 1: final weights", ONE)

    class UnfreezeAtOne(cb.BaseFinetuning):
        def freeze_before_training(self, pl_module: Any) -> None:
            self.freeze(pl_module.backbone)

        def finetune_function(self, pl_module: Any, current_epoch: int, optimizer: Any) -> None:
            if current_epoch == 1:
                self.unfreeze_and_add_param_group(pl_module.backbone, optimizer, lr=0.05)

    plain_model, _ = fit("auto", callbacks=[UnfreezeAtOne()])
    pdasgd_model, _ = run_pdasgd(row, lambda: fit(one_in_flight(), callbacks=[UnfreezeAtOne()]))
    compare_weights(row, plain_model, pdasgd_model)
    row.finish()


def test_model_pruning(matrix: Callable[..., Row]) -> None:
    row = matrix("ModelPruning", "L1-unstructured pruning (30%) at every epoch end: final weights and accuracy", ONE)

    def run(strategy: Any) -> torch.nn.Module:
        model, _ = fit(strategy, callbacks=[cb.ModelPruning("l1_unstructured", amount=0.3, verbose=0)], epochs=4)
        return model

    plain = run("auto")
    pdasgd = run_pdasgd(row, lambda: run(one_in_flight()))
    compare_accuracy(row, plain, pdasgd, 0.0)
    compare_weights(row, plain, pdasgd)
    row.finish()


def test_gradient_accumulation_scheduler(matrix: Callable[..., Row]) -> None:
    row = matrix("GradientAccumulationScheduler", "1 batch per step in epoch 0, then 2: weights and global_step", ONE)

    def run(strategy: Any) -> tuple[torch.nn.Module, int]:
        model, trainer = fit(strategy, callbacks=[cb.GradientAccumulationScheduler({0: 1, 1: 2})], batches=11)
        return model, trainer.global_step

    plain, plain_steps = run("auto")
    pdasgd, pdasgd_steps = run_pdasgd(row, lambda: run(one_in_flight()))
    row.compare("global_step", plain_steps, pdasgd_steps)
    compare_weights(row, plain, pdasgd)
    row.finish()


# ------------------------------------------------------------------------------------------- tuner
def test_learning_rate_finder_callback(matrix: Callable[..., Row]) -> None:
    row = matrix("LearningRateFinder", "losses of the lr sweep, suggested lr, weights after the fit", ONE)

    def run(strategy: Any) -> tuple[torch.nn.Module, Any]:
        finder = cb.LearningRateFinder(min_lr=1e-4, max_lr=1.0, num_training_steps=15, early_stop_threshold=None)
        model, _ = fit(strategy, callbacks=[finder], epochs=2, batches=8)
        return model, finder.optimal_lr

    plain_model, plain = run("auto")
    pdasgd_model, pdasgd = run_pdasgd(row, lambda: run(one_in_flight()))
    row.compare(
        "swept losses (max |difference|)",
        0.0,
        max(abs(a - b) for a, b in zip(plain.results["loss"], pdasgd.results["loss"])),
        EXACT,
    )
    row.compare("suggested lr", plain.suggestion(), pdasgd.suggestion(), 1e-12)
    compare_weights(row, plain_model, pdasgd_model)
    row.finish()


def test_batch_size_finder_callback(matrix: Callable[..., Row]) -> None:
    row = matrix("BatchSizeFinder", "batch size found (power mode, 3 trials), weights after the fit", ONE)

    def run(strategy: Any) -> tuple[torch.nn.Module, int]:
        finder = cb.BatchSizeFinder(mode="power", steps_per_trial=2, init_val=16, max_trials=3)
        model, _ = fit(strategy, callbacks=[finder], epochs=2, batches=6)
        return model, finder.optimal_batch_size

    plain_model, plain = run("auto")
    pdasgd_model, pdasgd = run_pdasgd(row, lambda: run(one_in_flight()))
    row.compare("optimal_batch_size", plain, pdasgd)
    compare_weights(row, plain_model, pdasgd_model)
    row.finish()


def test_tuner_lr_find(matrix: Callable[..., Row]) -> None:
    row = matrix("Tuner.lr_find", "losses of the lr sweep and the suggestion written to model.lr", ONE)

    def run(strategy: Any) -> tuple[list[float], float]:
        L.seed_everything(7, verbose=False)
        model = MatrixNet()
        trainer = L.Trainer(strategy=strategy, max_epochs=1, **_quiet())
        finder = Tuner(trainer).lr_find(
            model, datamodule=DigitsData(), min_lr=1e-4, max_lr=1.0, num_training=15, early_stop_threshold=None
        )
        assert finder is not None
        return finder.results["loss"], model.lr

    plain_losses, plain_lr = run("auto")
    pdasgd_losses, pdasgd_lr = run_pdasgd(row, lambda: run(one_in_flight()))
    row.compare(
        "swept losses (max |difference|)", 0.0, max(abs(a - b) for a, b in zip(plain_losses, pdasgd_losses)), EXACT
    )
    row.compare("model.lr", plain_lr, pdasgd_lr, 1e-12)
    row.finish()


def test_tuner_scale_batch_size(matrix: Callable[..., Row]) -> None:
    row = matrix(
        "Tuner.scale_batch_size", "batch size found (binsearch, 3 trials) and written to the datamodule", DEFAULT
    )

    def run(strategy: Any) -> tuple[int | None, int]:
        L.seed_everything(7, verbose=False)
        data = DigitsData()
        trainer = L.Trainer(strategy=strategy, max_epochs=1, **_quiet())
        found = Tuner(trainer).scale_batch_size(
            MatrixNet(), datamodule=data, mode="binsearch", steps_per_trial=2, init_val=16, max_trials=3
        )
        return found, data.batch_size

    plain = run("auto")
    pdasgd = run_pdasgd(row, lambda: run(default()))
    row.compare("(found, datamodule.batch_size)", list(plain), list(pdasgd))
    row.finish()


def _quiet() -> dict[str, Any]:
    from tests.helpers import trainer_kwargs

    return trainer_kwargs()


def test_every_builtin_callback_has_a_row() -> None:
    """A callback added to Lightning's ``__all__`` gets a row here before the matrix claims to cover it."""
    covered = {
        "ModelCheckpoint",
        "OnExceptionCheckpoint",
        "EarlyStopping",
        "Timer",
        "LearningRateMonitor",
        "ThroughputMonitor",
        "DeviceStatsMonitor",
        "SpikeDetection",
        "LambdaCallback",
        "TQDMProgressBar",
        "RichProgressBar",
        "ModelSummary",
        "RichModelSummary",
        "BasePredictionWriter",
        "StochasticWeightAveraging",
        "EMAWeightAveraging",
        "WeightAveraging",
        "BackboneFinetuning",
        "BaseFinetuning",
        "ModelPruning",
        "GradientAccumulationScheduler",
        "LearningRateFinder",
        "BatchSizeFinder",
    }
    abstract = {"Callback", "Checkpoint", "ProgressBar"}
    assert set(cb.__all__) - abstract - covered == set()
