"""Engine metrics reach Lightning's loggers (CSV and TensorBoard) and progress bars (TQDM and Rich)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import lightning as L
import pytest
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from lightning_pdasgd import PDASGDStrategy
from tests.helpers import trainer_kwargs
from tests.models import DigitsClassifier, DigitsData

EXPECTED = {
    "pdasgd/samples_per_sec", "pdasgd/staleness_mean", "pdasgd/staleness_max", "pdasgd/queue_depth",
    "pdasgd/forward_ms", "pdasgd/backward_ms", "pdasgd/forward_busy", "pdasgd/backward_busy",
    "pdasgd/updates_per_sec", "pdasgd/wall_time_s", "pdasgd/backward_threads", "pdasgd/staleness_frac_0",
    "pdasgd/staleness_frac_9+", "pdasgd/staleness_first_bucket", "pdasgd/staleness_last_bucket",
}


def _fit(tmp_path: Path, on_bar: bool = False, **kwargs: Any) -> L.Trainer:
    strategy = PDASGDStrategy(backward_threads=2, metrics="full", metrics_on_progress_bar=on_bar)
    trainer = L.Trainer(strategy=strategy, max_epochs=2, log_every_n_steps=5, **trainer_kwargs(**kwargs))
    trainer.fit(DigitsClassifier(), DigitsData(batch_size=32))
    return trainer


def test_csv_and_tensorboard_receive_engine_metrics(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    csv_logger, tb_logger = CSVLogger(tmp_path, name="csv"), TensorBoardLogger(tmp_path, name="tb")
    _fit(tmp_path, logger=[csv_logger, tb_logger])
    (metrics_file,) = (tmp_path / "csv").rglob("metrics.csv")
    with open(metrics_file) as handle:
        rows = list(csv.DictReader(handle))
    columns = {key for row in rows for key, value in row.items() if value}
    assert EXPECTED <= columns, EXPECTED - columns
    fractions = [sum(float(row[f"pdasgd/staleness_frac_{b}"]) for b in ("0", "1", "2", "3-4", "5-8", "9+"))
                 for row in rows if row.get("pdasgd/staleness_frac_0")]
    assert fractions and all(abs(total - 1.0) < 1e-6 for total in fractions)
    busy = [float(row["pdasgd/backward_busy"]) for row in rows if row.get("pdasgd/backward_busy")]
    assert all(0.0 <= value <= 1.0 for value in busy) and max(busy) > 0
    times = [float(row["pdasgd/wall_time_s"]) for row in rows if row.get("pdasgd/wall_time_s")]
    assert times == sorted(times) and times[0] > 0

    (event_dir,) = {path.parent for path in (tmp_path / "tb").rglob("events.out.tfevents.*")}
    events = EventAccumulator(str(event_dir))
    events.Reload()
    assert EXPECTED <= set(events.Tags()["scalars"])


@pytest.mark.parametrize("bar", [TQDMProgressBar, RichProgressBar])
def test_progress_bars_show_throughput_and_staleness_when_asked(tmp_path: Path, bar: type) -> None:
    trainer = _fit(tmp_path, on_bar=True, enable_progress_bar=True, callbacks=[bar()])
    shown = trainer.progress_bar_callback.get_metrics(trainer, trainer.lightning_module)
    assert "pdasgd/samples_per_sec" in shown and "pdasgd/staleness_mean" in shown
    assert "pdasgd/backward_ms" not in shown  # the rest stays in the loggers


@pytest.mark.parametrize(
    ("level", "expected"),
    [
        ("off", set()),
        ("basic", {"pdasgd/samples_per_sec", "pdasgd/staleness_mean", "pdasgd/staleness_max",
                   "pdasgd/queue_depth", "pdasgd/wall_time_s", "pdasgd/skipped_updates", "pdasgd/guard_trips"}),
    ],
)
def test_metrics_level_controls_what_is_logged(tmp_path: Path, level: str, expected: set[str]) -> None:
    trainer = L.Trainer(strategy=PDASGDStrategy(metrics=level), max_epochs=1, log_every_n_steps=5,
                        **trainer_kwargs())
    trainer.fit(DigitsClassifier(), DigitsData(batch_size=32))
    logged = {key for key in trainer.callback_metrics if key.startswith("pdasgd/")}
    assert logged == expected, logged ^ expected


def test_short_runs_get_metrics_and_the_bar_stays_clean_by_default(tmp_path: Path) -> None:
    """A run shorter than `log_every_n_steps` still logs at its epoch's last batch; the bar shows the user's
    metrics only, as with plain Lightning."""
    strategy = PDASGDStrategy()
    trainer = L.Trainer(strategy=strategy, max_epochs=1, limit_train_batches=7, log_every_n_steps=50,
                        callbacks=[TQDMProgressBar()], **trainer_kwargs(enable_progress_bar=True))
    trainer.fit(DigitsClassifier(), DigitsData(batch_size=32))
    assert "pdasgd/samples_per_sec" in trainer.callback_metrics
    shown = trainer.progress_bar_callback.get_metrics(trainer, trainer.lightning_module)
    assert not any(key.startswith("pdasgd/") for key in shown), shown


def test_bad_metrics_level_is_refused() -> None:
    with pytest.raises(ValueError, match="`metrics` must be one of"):
        PDASGDStrategy(metrics="verbose")


class _LiveEngineMetrics(L.Callback):
    """At each batch end: the ``pdasgd/*`` values Lightning re-reads (its live step values) and those it shows."""

    def __init__(self) -> None:
        self.live: list[tuple[int, bool]] = []
        self.shown: list[bool] = []

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        names = {metric.meta.name for _, metric in trainer._results.valid_items()}
        self.live.append((trainer.global_step, any(name.startswith("pdasgd/") for name in names)))
        self.shown.append("pdasgd/samples_per_sec" in trainer.callback_metrics)


def test_lightning_rereads_the_engines_metrics_only_at_the_steps_that_log_them(tmp_path: Path) -> None:
    """Lightning re-reads every value logged in an epoch at each later batch end, a cost per key and step: the
    engine's values are retired after the step that logged them, and Lightning still shows the last ones."""
    watch = _LiveEngineMetrics()
    strategy = PDASGDStrategy(backward_threads=2)
    trainer = L.Trainer(strategy=strategy, max_steps=23, log_every_n_steps=5,
                        **trainer_kwargs(callbacks=[watch], logger=CSVLogger(tmp_path)))
    trainer.fit(DigitsClassifier(), DigitsData(batch_size=32))
    live_steps = [step for step, live in watch.live if live]
    assert live_steps == [5, 10, 15, 20], watch.live  # global_step after the step that logged
    assert watch.shown[4:] == [True] * (len(watch.shown) - 4) and not any(watch.shown[:4])
    (metrics_file,) = tmp_path.rglob("metrics.csv")
    with open(metrics_file) as handle:
        logged = [int(row["step"]) for row in csv.DictReader(handle) if row.get("pdasgd/samples_per_sec")]
    assert logged == [4, 9, 14, 19]


class _ShownAtLoggingSteps(L.Callback):
    """The ``pdasgd/wall_time_s`` Lightning holds after each batch, by step."""

    def __init__(self) -> None:
        self.shown: dict[int, float] = {}

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        value = trainer.callback_metrics.get("pdasgd/wall_time_s")
        if value is not None:
            self.shown[trainer.global_step - 1] = float(value)


def test_every_logging_step_writes_its_own_window_in_every_epoch(tmp_path: Path) -> None:
    """After the first log of a key in an epoch, its later values take Lightning's steady-state path: each logging
    step must still reach the loggers and ``callback_metrics`` with that step's value, across epochs."""
    watch = _ShownAtLoggingSteps()
    trainer = L.Trainer(strategy=PDASGDStrategy(backward_threads=2), max_epochs=2, log_every_n_steps=4,
                        **trainer_kwargs(callbacks=[watch], logger=CSVLogger(tmp_path)))
    trainer.fit(DigitsClassifier(), DigitsData(batch_size=64))
    (metrics_file,) = tmp_path.rglob("metrics.csv")
    with open(metrics_file) as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("pdasgd/wall_time_s")]
    logged = {int(row["step"]): float(row["pdasgd/wall_time_s"]) for row in rows}
    steps = 2 * trainer.num_training_batches
    assert sorted(logged) == [step for step in range(steps) if (step + 1) % 4 == 0]  # Lightning's cadence
    times = [logged[step] for step in sorted(logged)]
    assert all(later > earlier for earlier, later in zip(times, times[1:])), times  # each step its own window
    assert all(abs(watch.shown[step] - logged[step]) < 1e-3 for step in logged), (watch.shown, logged)
    last_batches = [trainer.num_training_batches - 1, steps - 1]  # each epoch's last batch logs too
    assert all(watch.shown[step] > watch.shown[step - 1] for step in last_batches), watch.shown


@pytest.mark.usefixtures("users_exact_mode")
def test_lightnings_own_step_counts_every_step_and_sample_at_lightnings_logging_cadence(tmp_path: Path) -> None:
    """The exact mode counts its steps in plain numbers and hands them over when Lightning writes: every step and
    sample of the fit still lands in the statistics (each epoch ends on a smaller batch), and the loggers get a
    window at Lightning's cadence."""
    data = DigitsData(batch_size=64)
    trainer = L.Trainer(strategy=PDASGDStrategy(max_in_flight=1), max_epochs=2, log_every_n_steps=4,
                        **trainer_kwargs(logger=CSVLogger(tmp_path)))
    trainer.fit(DigitsClassifier(), data)
    stats = trainer.strategy.stats
    assert len(data.train_set) % 64 != 0
    assert stats.total_forwards == trainer.global_step == 2 * trainer.num_training_batches
    assert stats.total_samples == 2 * len(data.train_set)
    (metrics_file,) = tmp_path.rglob("metrics.csv")
    with open(metrics_file) as handle:
        logged = [int(row["step"]) for row in csv.DictReader(handle) if row.get("pdasgd/samples_per_sec")]
    assert logged == [step for step in range(trainer.global_step) if (step + 1) % 4 == 0]
