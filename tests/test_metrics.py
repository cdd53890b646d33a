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
    "pdasgd/staleness_frac_9+",
}


def _fit(tmp_path: Path, **kwargs: Any) -> L.Trainer:
    trainer = L.Trainer(strategy=PDASGDStrategy(backward_threads=2, metrics="full"), max_epochs=2, log_every_n_steps=5,
                        **trainer_kwargs(**kwargs))
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
def test_progress_bars_show_throughput_and_staleness(tmp_path: Path, bar: type) -> None:
    trainer = _fit(tmp_path, enable_progress_bar=True, callbacks=[bar()])
    shown = trainer.progress_bar_callback.get_metrics(trainer, trainer.lightning_module)
    assert "pdasgd/samples_per_sec" in shown and "pdasgd/staleness_mean" in shown
    assert "pdasgd/backward_ms" not in shown  # the rest stays in the loggers
