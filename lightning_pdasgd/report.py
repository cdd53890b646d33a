"""``lightning-pdasgd report LOG_DIR [--out DIR]``: PNG plots of a run from its CSVLogger ``metrics.csv``.

Why from ``metrics.csv``: it is the one log format every Lightning install can write and read back without extra
services, and it holds every ``pdasgd/`` metric the strategy logs. Three plots, each skipped with a message when
its columns are missing (a run without PD-ASGD, or without validation):

- ``val_accuracy.png``: ``val_acc`` against wall time (``pdasgd/wall_time_s``), or against the step when the log has
  no wall-time column (CSVLogger records none of its own);
- ``throughput.png``: ``pdasgd/samples_per_sec`` against the step;
- ``staleness.png``: histograms of ``pdasgd/staleness_mean`` and, when logged, ``pdasgd/staleness_max``.

matplotlib is optional (the ``examples`` extra); the figures are drawn on the Agg canvas directly, so no GUI
backend is needed and pyplot's global state is left alone.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from lightning_pdasgd import metrics as names

METRICS_FILE = "metrics.csv"
STEP = "step"
VAL_ACC = "val_acc"
WALL_TIME = "pdasgd/wall_time_s"
SAMPLES_PER_SEC = names.SAMPLES_PER_SECOND
STALENESS_MEAN = names.STALENESS_MEAN
STALENESS_MAX = names.STALENESS_MAX

EXIT_OK = 0
EXIT_NOTHING_PLOTTED = 1
EXIT_NO_METRICS = 2


class ReportError(Exception):
    """A report that cannot be made; ``exit_code`` is what the command returns."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class RunMetrics:
    """The numeric cells of one ``metrics.csv``: its columns and one dict per row (empty cells left out)."""

    path: Path
    columns: list[str]
    rows: list[dict[str, float]]

    def has(self, *columns: str) -> bool:
        return all(column in self.columns for column in columns)

    def series(self, y: str, x: str = STEP) -> tuple[np.ndarray, np.ndarray]:
        """``(x, y)`` over the rows where both are logged, in file order."""
        pairs = [(row[x], row[y]) for row in self.rows if x in row and y in row]
        xs, ys = zip(*pairs) if pairs else ((), ())
        return np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)

    def values(self, column: str) -> np.ndarray:
        return np.asarray([row[column] for row in self.rows if column in row], dtype=float)


@dataclass
class Report:
    """What ``write_report`` did: the PNGs it wrote and a message for every plot it skipped."""

    metrics_path: Path
    written: list[Path] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------- reading
def find_metrics_csv(log_dir: Path) -> Path:
    """The newest ``metrics.csv`` under ``log_dir`` (searched recursively; newest = last modified).

    A CSVLogger writes ``<save_dir>/<name>/version_<n>/metrics.csv`` and every new run adds a version, so the last
    modified file is the latest run, whatever the names and version numbers are.
    """
    if log_dir.is_file() and log_dir.name == METRICS_FILE:
        return log_dir
    if not log_dir.is_dir():
        raise ReportError(f"'{log_dir}' is not a directory: give the log folder of a run.", EXIT_NO_METRICS)
    candidates = sorted(log_dir.rglob(METRICS_FILE), key=lambda path: (path.stat().st_mtime, str(path)))
    if not candidates:
        raise ReportError(
            f"No {METRICS_FILE} found under '{log_dir}'. Point the report at the save_dir of a run logged with"
            " `lightning.pytorch.loggers.CSVLogger` (e.g. `--trainer.logger lightning.pytorch.loggers.CSVLogger`).",
            EXIT_NO_METRICS,
        )
    return candidates[-1]


def read_metrics(path: Path) -> RunMetrics:
    """Parse a CSVLogger file; cells that are empty or not numbers are left out of their row."""
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        columns = list(reader.fieldnames or [])
        rows = [_numeric_cells(row) for row in reader]
    return RunMetrics(path=path, columns=columns, rows=rows)


def _numeric_cells(row: dict[str, Any]) -> dict[str, float]:
    cells = {}
    for key, text in row.items():
        try:
            value = float(text)
        except (TypeError, ValueError):
            continue
        if key is not None and math.isfinite(value):
            cells[key] = value
    return cells


# ------------------------------------------------------------------------------------------------- series
def validation_accuracy_series(run: RunMetrics) -> tuple[np.ndarray, np.ndarray, str]:
    """``val_acc`` against wall time in seconds when the run logged ``pdasgd/wall_time_s``, else against the step.

    Validation rows rarely carry the wall time themselves (the strategy logs it on training steps), so a
    validation row without it gets the wall time interpolated from the steps around it.
    """
    steps, accuracy = run.series(VAL_ACC)
    if not run.has(WALL_TIME):
        return steps, accuracy, f"step (no {WALL_TIME} column in {METRICS_FILE})"
    clock_steps, clock = run.series(WALL_TIME)
    if len(clock) == 0:
        return steps, accuracy, f"step ({WALL_TIME} is never logged)"
    order = np.argsort(clock_steps, kind="stable")
    seconds = [
        row[WALL_TIME] if WALL_TIME in row else float(np.interp(row[STEP], clock_steps[order], clock[order]))
        for row in run.rows
        if VAL_ACC in row and STEP in row
    ]
    return np.asarray(seconds, dtype=float), accuracy, "wall time (s)"


def _missing(run: RunMetrics, *columns: str) -> Optional[str]:
    absent = [column for column in columns if column not in run.columns]
    return f"no {', '.join(f'`{column}`' for column in absent)} column in {run.path}" if absent else None


# ------------------------------------------------------------------------------------------------- plots
def plot_validation_accuracy(run: RunMetrics, path: Path) -> Path:
    """The curve that shows whether asynchronous updates cost accuracy, and what they gain in time."""
    x, y, xlabel = validation_accuracy_series(run)
    figure, axes = _figure()
    axes.plot(x, y, marker="o", color="tab:blue")
    axes.set(xlabel=xlabel, ylabel=VAL_ACC, title=f"validation accuracy (last {y[-1]:.4f})" if len(y) else VAL_ACC)
    axes.grid(alpha=0.3)
    return _save(figure, path)


def plot_throughput(run: RunMetrics, path: Path) -> Path:
    """Samples per second per logging window: the speed PD-ASGD is for, and where it dips (validation, drains)."""
    steps, samples = run.series(SAMPLES_PER_SEC)
    figure, axes = _figure()
    axes.plot(steps, samples, color="tab:green", label=SAMPLES_PER_SEC)
    if len(samples):
        axes.axhline(float(np.median(samples)), color="gray", linestyle="--", label=f"median {np.median(samples):.0f}")
    axes.set(xlabel=STEP, ylabel="samples / s", title="training throughput")
    axes.legend()
    axes.grid(alpha=0.3)
    return _save(figure, path)


def plot_staleness(run: RunMetrics, path: Path) -> Path:
    """How stale the applied gradients were: measured, because several backward threads do not bound it."""
    from matplotlib.ticker import MaxNLocator

    panels = [column for column in (STALENESS_MEAN, STALENESS_MAX) if len(run.values(column))]
    figure, axes = _figure(columns=len(panels))
    for ax, column, color in zip(np.atleast_1d(axes), panels, ("tab:orange", "tab:red")):
        values = run.values(column)
        bins = _bins(values)
        ax.hist(values, bins=bins, color=color, edgecolor="black")
        if not isinstance(bins, str):  # integer staleness: one bar per value, labelled by the value
            ax.xaxis.set_major_locator(MaxNLocator(nbins=min(len(bins), 12), integer=True, min_n_ticks=1))
        ax.set(xlabel=column, ylabel="logging windows", title=f"mean {values.mean():.2f} over {len(values)} windows")
    figure.suptitle("staleness (updates of a parameter between its read and its update)")
    return _save(figure, path)


def _bins(values: np.ndarray) -> Any:
    """Integer-wide bins for integer data (staleness_max), automatic ones otherwise."""
    if len(values) and np.all(values == np.round(values)):
        return np.arange(values.min() - 0.5, values.max() + 1.5)
    return "auto"


def _figure(columns: int = 1) -> tuple[Any, Any]:
    figure_class = _require_matplotlib()
    figure = figure_class(figsize=(6.4 * columns, 4.8), layout="constrained")
    axes = figure.subplots(1, columns) if columns > 1 else figure.subplots()
    return figure, axes


def _save(figure: Any, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    figure.savefig(path, dpi=100)
    return path


def _require_matplotlib() -> Any:
    """Import matplotlib's ``Figure``, or fail with the install command (matplotlib is an optional dependency)."""
    try:
        import matplotlib  # noqa: F401 - the parent package first, so a missing matplotlib is caught here
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ReportError(
            f"`lightning-pdasgd report` needs matplotlib, which cannot be imported ({error}). Install it with"
            " `pip install 'lightning-pdasgd[examples]'` or `pip install matplotlib`.",
            EXIT_NOTHING_PLOTTED,
        ) from error
    return Figure


# ------------------------------------------------------------------------------------------------- report
PLOTS = (  # file name, plot, the columns it needs
    ("val_accuracy.png", plot_validation_accuracy, (VAL_ACC,)),
    ("throughput.png", plot_throughput, (SAMPLES_PER_SEC,)),
    ("staleness.png", plot_staleness, (STALENESS_MEAN,)),
)


def write_report(log_dir: Path, out: Optional[Path] = None) -> Report:
    """Write every plot whose columns the newest run under ``log_dir`` has; ``out`` defaults to ``<run>/report``."""
    path = find_metrics_csv(log_dir)
    run = read_metrics(path)
    out = out if out is not None else path.parent / "report"
    report = Report(metrics_path=path)
    _require_matplotlib()
    out.mkdir(parents=True, exist_ok=True)
    for name, plot, columns in PLOTS:
        reason = _missing(run, *columns) or _never_logged(run, columns)
        if reason:
            report.skipped.append(f"skipped {name}: {reason}")
            continue
        report.written.append(plot(run, out / name))
    return report


def _never_logged(run: RunMetrics, columns: tuple[str, ...]) -> Optional[str]:
    empty = [column for column in columns if len(run.values(column)) == 0]
    return f"`{empty[0]}` has no value in {run.path}" if empty else None


def parse_args(argv: list[str], prog: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog, description="PNG plots of a run from its CSVLogger metrics.csv.")
    parser.add_argument("log_dir", type=Path, help="a CSVLogger save_dir, run or version folder (searched recursively)")
    parser.add_argument("--out", type=Path, default=None, help="folder for the PNGs (default: <version folder>/report)")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None, prog: str = "lightning-pdasgd report") -> int:
    """Run the report command; returns the exit code (2: no metrics.csv, 1: nothing could be plotted)."""
    args = parse_args(sys.argv[1:] if argv is None else argv, prog)
    try:
        report = write_report(args.log_dir, args.out)
    except ReportError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return error.exit_code
    print(f"read {report.metrics_path}")
    for message in report.skipped:
        print(message, file=sys.stderr)
    for path in report.written:
        print(f"wrote {path}")
    if not report.written:
        print(f"{prog}: error: nothing to plot in {report.metrics_path}", file=sys.stderr)
        return EXIT_NOTHING_PLOTTED
    return EXIT_OK
