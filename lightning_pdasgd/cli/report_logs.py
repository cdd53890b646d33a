"""Reading a run's logs for the report: CSVLogger's ``metrics.csv`` or TensorBoard event files, as series.

Why separate from the plots: what a run logged (and under which names) is the part tests and other tools need
without matplotlib; ``report.py`` draws it.
"""

from __future__ import annotations

import csv
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from lightning_pdasgd.engine.metrics import STALENESS_FRACTION_PREFIX, WALL_TIME
from lightning_pdasgd.errors import ReportError

METRICS_FILE = "metrics.csv"
EVENTS_GLOB = "events.out.tfevents.*"
STEP = "step"
EPOCH = "epoch"
VAL_ACC = "val_acc"
# the training loss under the names LightningModules commonly log it; the first one present is plotted
LOSS_NAMES = ("train_loss", "train_loss_step", "loss", "train/loss", "training_loss", "train_loss_epoch")

EXIT_OK = 0
EXIT_NOTHING_PLOTTED = 1
EXIT_NO_METRICS = 2

RUN_COLOR = "tab:blue"
BASELINE_COLOR = "tab:orange"



@dataclass
class Series:
    """One metric: its values by step, in logging order, and the events' own clock when the log has one."""

    steps: np.ndarray
    values: np.ndarray
    event_times: Optional[np.ndarray] = None  # TensorBoard: seconds since the epoch (the Unix one) of each value


@dataclass(eq=False)
class Run:
    """Every scalar of one run, whatever the log format."""

    source: Path  # the metrics.csv file, or the folder of the event files
    log_format: str  # "csv" or "tensorboard"
    series: dict[str, Series]
    label: str = "run"

    @property
    def names(self) -> list[str]:
        return sorted(self.series)

    def has(self, name: str) -> bool:
        return name in self.series and len(self.series[name].values) > 0

    def get(self, name: str) -> Series:
        return self.series[name]

    def clock(self, name: str) -> Optional[np.ndarray]:
        """Seconds since the run started at each value of ``name``, or ``None`` when the log has no clock.

        ``pdasgd/wall_time_s`` is preferred (it counts from the start of fit and is logged on training steps; other
        rows get it interpolated by step); a TensorBoard log without it uses its events' timestamps.
        """
        series = self.series[name]
        if self.has(WALL_TIME):
            clock = self.series[WALL_TIME]
            order = np.argsort(clock.steps, kind="stable")
            return np.interp(series.steps, clock.steps[order], clock.values[order])
        if series.event_times is not None:
            return series.event_times - self.first_event_time()
        return None

    def first_event_time(self) -> float:
        """The timestamp of the run's first logged event: its clock's zero when it has no ``pdasgd/wall_time_s``."""
        times = [float(s.event_times.min()) for s in self.series.values() if s.event_times is not None and len(s.steps)]
        return min(times) if times else 0.0

    def epoch_boundaries(self) -> np.ndarray:
        """The step at which each epoch after the first begins: the last step logged in the epoch before.

        Lightning logs ``epoch`` with every row, and epoch-level metrics (validation, ``on_epoch=True``) at the
        epoch's last step, so that step is the boundary.
        """
        if not self.has(EPOCH):
            return np.asarray([], dtype=float)
        epochs = self.series[EPOCH]
        last_step: dict[int, float] = {}
        for step, epoch in zip(epochs.steps, epochs.values):
            last_step[int(epoch)] = max(last_step.get(int(epoch), -math.inf), float(step))
        ordered = sorted(last_step)
        return np.asarray([last_step[epoch] for epoch in ordered[:-1]], dtype=float)


@dataclass
class Report:
    """What ``write_report`` did: the runs it read, the PNGs it wrote and a message for every plot it skipped."""

    run: Run
    baseline: Optional[Run] = None
    written: list[Path] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------- finding runs
def find_run_source(log_dir: Path) -> tuple[Path, str]:
    """The newest run under ``log_dir``: a ``metrics.csv`` or a folder of TensorBoard event files.

    Both loggers write ``<save_dir>/<name>/version_<n>/`` and every new run adds a version, so the most recently
    modified log file is the latest run, whatever the names and version numbers are.
    """
    if log_dir.is_file():
        if log_dir.name == METRICS_FILE:
            return log_dir, "csv"
        if log_dir.match(EVENTS_GLOB):
            return log_dir.parent, "tensorboard"
    if not log_dir.is_dir():
        raise ReportError(f"'{log_dir}' is not a directory: give the log folder of a run.", EXIT_NO_METRICS)
    candidates = [(path, "csv") for path in log_dir.rglob(METRICS_FILE)]
    candidates += [(path, "tensorboard") for path in log_dir.rglob(EVENTS_GLOB)]
    if not candidates:
        raise ReportError(
            f"No {METRICS_FILE} and no TensorBoard event file ({EVENTS_GLOB}) found under '{log_dir}'. Point the"
            " report at the save_dir of a run logged with `lightning.pytorch.loggers.CSVLogger` or"
            " `TensorBoardLogger` (e.g. `--trainer.logger lightning.pytorch.loggers.CSVLogger`).",
            EXIT_NO_METRICS,
        )
    path, log_format = max(candidates, key=lambda item: (item[0].stat().st_mtime, str(item[0])))
    return (path, "csv") if log_format == "csv" else (path.parent, "tensorboard")


def read_run(log_dir: Path, label: str = "run") -> Run:
    """Read the newest run under ``log_dir`` in whichever format it was logged."""
    source, log_format = find_run_source(log_dir)
    series = read_csv(source) if log_format == "csv" else read_tensorboard(source)
    return Run(source=source, log_format=log_format, series=series, label=label)


def read_csv(path: Path) -> dict[str, Series]:
    """CSVLogger's file: one row per logging call; empty cells and cells that are not finite numbers are skipped."""
    steps: dict[str, list[float]] = defaultdict(list)
    values: dict[str, list[float]] = defaultdict(list)
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            cells = _numeric_cells(row)
            if STEP not in cells:
                continue
            for name, value in cells.items():
                if name != STEP:
                    steps[name].append(cells[STEP])
                    values[name].append(value)
    return {name: Series(np.asarray(steps[name]), np.asarray(values[name])) for name in values}


def _numeric_cells(row: dict[Any, Any]) -> dict[str, float]:
    cells = {}
    for key, text in row.items():
        try:
            value = float(text)
        except (TypeError, ValueError):
            continue
        if key is not None and math.isfinite(value):
            cells[key] = value
    return cells


def read_tensorboard(folder: Path) -> dict[str, Series]:
    """Every scalar in the event files of ``folder``, with each event's timestamp, read by tensorboard itself."""
    try:
        import tensorboard  # noqa: F401 - the parent package first, so a missing tensorboard is caught here
        from tensorboard.backend.event_processing import event_accumulator
    except ImportError as error:
        raise ReportError(
            f"'{folder}' holds TensorBoard event files; reading them needs the `tensorboard` package, which cannot"
            f" be imported ({error}). Install it with `pip install tensorboard`, or log with CSVLogger.",
            EXIT_NOTHING_PLOTTED,
        ) from error
    accumulator = event_accumulator.EventAccumulator(str(folder), size_guidance={event_accumulator.SCALARS: 0})
    accumulator.Reload()
    series = {}
    for tag in accumulator.Tags().get(event_accumulator.SCALARS, []):
        events = [event for event in accumulator.Scalars(tag) if math.isfinite(event.value)]
        series[tag] = Series(
            steps=np.asarray([event.step for event in events], dtype=float),
            values=np.asarray([event.value for event in events], dtype=float),
            event_times=np.asarray([event.wall_time for event in events], dtype=float),
        )
    return series


def loss_name(run: Run) -> Optional[str]:
    return next((name for name in LOSS_NAMES if run.has(name)), None)


def staleness_fractions(run: Run) -> list[str]:
    """The ``pdasgd/staleness_frac_<bucket>`` metrics, ordered by the bucket's lowest staleness (0, 1, 2, 3-4...)."""
    names = [name for name in run.names if name.startswith(STALENESS_FRACTION_PREFIX) and run.has(name)]

    def lowest(name: str) -> int:
        match = re.match(r"\d+", name[len(STALENESS_FRACTION_PREFIX) :])
        return int(match.group()) if match else 1 << 30

    return sorted(names, key=lowest)


# ------------------------------------------------------------------------------------------------- axes
def validation_accuracy_series(run: Run, name: str = VAL_ACC) -> tuple[np.ndarray, np.ndarray, str]:
    """``name`` against wall time in seconds when the run has a clock, else against the step (the label says)."""
    series = run.get(name)
    clock = run.clock(name)
    if clock is None:
        return series.steps, series.values, f"step (no {WALL_TIME} in {run.source.name}, no event times)"
    return clock, series.values, "wall time (s)"
