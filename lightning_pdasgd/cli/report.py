"""``lightning-pdasgd report LOG_DIR [--out DIR] [--baseline LOG_DIR]``: PNG plots of a run, beside a baseline.

Why these plots: whether PD-ASGD pays is a question of loss and accuracy against time, next to a plain run of the
same model, and of how stale the applied gradients were while it trained. The report reads the two log formats
Lightning writes without extra services -- CSVLogger's ``metrics.csv`` and TensorBoardLogger's event files
(through ``tensorboard``'s own reader, imported only when such a file is found) -- and writes:

- ``loss.png``: the training loss against the step, with the baseline's;
- ``val_accuracy.png``: ``val_acc`` against the step and, when the run has a clock, against wall time, with the
  baseline's;
- ``throughput.png``: ``pdasgd/samples_per_sec`` against the step, with its median;
- ``staleness.png``: the staleness distribution over the run (the ``pdasgd/staleness_frac_*`` buckets, stacked),
  with the mean staleness below and, where logged (``metrics="full"``), the staleness of the bucket the forward
  reaches first (input side) and last (output side).

Every plot on a step axis has a dotted line at each epoch boundary, taken from the ``epoch`` value Lightning logs
with every row. A plot whose metrics are missing is skipped with a message naming them.

Wall time comes from ``pdasgd/wall_time_s`` (seconds since fit started, logged by the strategy) or, for a
TensorBoard run without it (a plain Lightning baseline), from the events' own timestamps, counted from the first
event. A CSV run without ``pdasgd/wall_time_s`` has no clock: it is plotted against the step only.

matplotlib is optional (the ``examples`` extra), and so is tensorboard (the ``dev`` extra); the figures are drawn
on the Agg canvas directly, so no GUI backend is needed and pyplot's global state is left alone.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from lightning_pdasgd.cli.report_logs import (  # noqa: F401 - re-exported: the report's public reading functions
    BASELINE_COLOR,
    EPOCH,
    EXIT_NO_METRICS,
    EXIT_NOTHING_PLOTTED,
    EXIT_OK,
    LOSS_NAMES,
    RUN_COLOR,
    STEP,
    VAL_ACC,
    Report,
    ReportError,
    Run,
    Series,
    find_run_source,
    loss_name,
    read_csv,
    read_run,
    read_tensorboard,
    staleness_fractions,
    validation_accuracy_series,
)
from lightning_pdasgd.engine.metrics import (
    SAMPLES_PER_SECOND,
    STALENESS_FIRST_BUCKET,
    STALENESS_FRACTION_PREFIX,
    STALENESS_LAST_BUCKET,
    STALENESS_MAX,
    STALENESS_MEAN,
    WALL_TIME,
)


def _epoch_lines(axes: Any, run: Run, to_x: Optional[Callable[[np.ndarray], np.ndarray]] = None) -> None:
    """Dotted vertical lines at the run's epoch boundaries, labelled with the epoch they begin."""
    boundaries = run.epoch_boundaries()
    if to_x is not None and len(boundaries):
        boundaries = to_x(boundaries)
    for index, x in enumerate(boundaries):
        axes.axvline(x, color="black", linestyle=":", linewidth=0.8, alpha=0.5,
                     label="epoch boundary (n: epoch that starts)" if index == 0 else None)  # fmt: skip
        if len(boundaries) <= 20:
            axes.annotate(f"{index + 1}", (x, 1.0), xycoords=("data", "axes fraction"), xytext=(2, -10),
                          textcoords="offset points", fontsize=7, color="dimgray")  # fmt: skip


def _steps_to_seconds(run: Run) -> Optional[Callable[[np.ndarray], np.ndarray]]:
    """Map steps to the run's wall time (for epoch lines on a time axis), or ``None`` without a clock."""
    reference = WALL_TIME if run.has(WALL_TIME) else next(iter(run.series), None)
    if reference is None:
        return None
    clock = run.clock(reference)
    if clock is None:
        return None
    steps = run.get(reference).steps
    order = np.argsort(steps, kind="stable")
    return lambda x: np.interp(x, steps[order], clock[order])


# ------------------------------------------------------------------------------------------------- plots
def plot_loss(run: Run, baseline: Optional[Run], path: Path) -> Path:
    """The training loss, ours beside the baseline's: does asynchrony cost optimisation progress per step?"""
    figure, axes = _figure()
    plotted = []
    for each, color in _runs(run, baseline):
        name = loss_name(each)
        if name is None:
            continue
        series = each.get(name)
        window = max(1, len(series.values) // 20)
        axes.plot(series.steps, series.values, color=color, linewidth=0.8, alpha=0.3)
        axes.plot(series.steps, _moving_average(series.values, window), color=color, linewidth=1.8,
                  label=f"{each.label} ({name}, mean of {window} logged values)")  # fmt: skip
        plotted.append(series.values)
    _epoch_lines(axes, run)
    values = np.concatenate(plotted)
    if values.min() > 0 and values.max() / values.min() > 20:  # a loss that falls by decades reads better in log
        axes.set_yscale("log")
    axes.set(xlabel=STEP, ylabel="training loss", title="training loss")
    _finish(axes)
    return _save(figure, path)


def plot_validation_accuracy(run: Run, baseline: Optional[Run], path: Path, name: str = VAL_ACC) -> Path:
    """Accuracy by step (sample efficiency) and by wall time (what the user waits for), beside the baseline."""
    timed = [(each, color) for each, color in _runs(run, baseline) if each.has(name) and each.clock(name) is not None]
    figure, axes = _figure(columns=2 if timed else 1)
    by_step, by_time = (axes[0], axes[1]) if timed else (axes, None)
    for each, color in _runs(run, baseline):
        if each.has(name):
            series = each.get(name)
            by_step.plot(series.steps, series.values, marker="o", markersize=3, color=color,
                         label=f"{each.label} (last {series.values[-1]:.4f})")  # fmt: skip
    _epoch_lines(by_step, run)
    by_step.set(xlabel=STEP, ylabel=name, title=f"{name} by step")
    _finish(by_step)
    if by_time is not None:
        for each, color in timed:
            x, y, _ = validation_accuracy_series(each, name)
            by_time.plot(x, y, marker="o", markersize=3, color=color, label=f"{each.label} (end {x[-1]:.1f} s)")
        timed_runs = [id(each) for each, _ in timed]
        untimed = [each.label for each, _ in _runs(run, baseline) if each.has(name) and id(each) not in timed_runs]
        title = f"{name} by wall time" + (f" ({', '.join(untimed)}: no clock in its log)" if untimed else "")
        converter = _steps_to_seconds(run)
        if converter is not None and any(each is run for each, _ in timed):
            _epoch_lines(by_time, run, converter)
        by_time.set(xlabel="wall time since fit started (s)", ylabel=name, title=title)
        _finish(by_time)
    return _save(figure, path)


def plot_throughput(run: Run, baseline: Optional[Run], path: Path) -> Path:
    """Samples per second per logging window: the speed PD-ASGD is for, and where it dips (validation, drains)."""
    series = run.get(SAMPLES_PER_SECOND)
    figure, axes = _figure()
    axes.plot(series.steps, series.values, color="tab:green", label=SAMPLES_PER_SECOND)
    median = float(np.median(series.values))
    axes.axhline(median, color="gray", linestyle="--", label=f"median {median:,.0f}")
    if baseline is not None and baseline.has(SAMPLES_PER_SECOND):
        other = baseline.get(SAMPLES_PER_SECOND)
        axes.plot(other.steps, other.values, color=BASELINE_COLOR, label=f"{baseline.label}")
    _epoch_lines(axes, run)
    axes.set(xlabel=STEP, ylabel="samples / s", title="training throughput")
    axes.set_ylim(bottom=0)
    _finish(axes)
    return _save(figure, path)


def plot_staleness(run: Run, baseline: Optional[Run], path: Path) -> Path:
    """How stale the applied gradients were, over the run: on top the share of updates in each staleness bucket,
    stacked; below the mean staleness. Measured, because several backward threads do not bound it."""
    fractions = staleness_fractions(run)
    figure_class = _require_matplotlib()
    figure = figure_class(figsize=(8.0, 5.6 if fractions else 3.6), layout="constrained")
    if fractions:
        shares, below = figure.subplots(2, 1, sharex=True, height_ratios=(2, 1))
        steps = run.get(fractions[0]).steps
        stack = [np.interp(steps, run.get(name).steps, run.get(name).values) for name in fractions]
        labels = [f"staleness {name[len(STALENESS_FRACTION_PREFIX):]}" for name in fractions]
        shares.stackplot(steps, *stack, labels=labels, colors=_bucket_colors(len(fractions)), alpha=0.9)
        _epoch_lines(shares, run)
        shares.set(ylim=(0, 1), ylabel="share of updates", title="staleness of the applied updates, per logging window")
        handles, names = shares.get_legend_handles_labels()
        shares.legend(handles[::-1], names[::-1], fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    else:
        below = figure.subplots()
    if run.has(STALENESS_MEAN):
        mean = run.get(STALENESS_MEAN)
        below.plot(mean.steps, mean.values, color="black", linewidth=1.2,
                   label=f"mean (over the run {mean.values.mean():.2f})")  # fmt: skip
    for name, label, color in ((STALENESS_FIRST_BUCKET, "input-side bucket (the forward reads it first)", "tab:blue"),
                               (STALENESS_LAST_BUCKET, "output-side bucket (read last)", "tab:green")):
        if run.has(name):  # staleness by depth (`metrics="full"`): lazy reads keep the output side fresh
            depth = run.get(name)
            below.plot(depth.steps, depth.values, color=color, linewidth=1.0,
                       label=f"{label} ({depth.values.mean():.2f})")  # fmt: skip
    if run.has(STALENESS_MAX):
        most = run.get(STALENESS_MAX)
        below.plot(most.steps, most.values, color="tab:red", linewidth=0.8, linestyle="--",
                   label=f"max (over the run {most.values.max():.0f})")  # fmt: skip
    _epoch_lines(below, run)
    below.set(xlabel=STEP, ylabel="staleness (updates)")
    below.set_ylim(bottom=0)
    if not fractions:
        below.set(title="staleness of the applied updates (updates of a parameter between its read and its update)")
    below.grid(alpha=0.3)
    below.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _save(figure, path)


def _moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Centred moving mean (shorter at the ends): a per-step loss is too noisy to compare two runs by eye."""
    if window <= 1 or len(values) < 2:
        return values
    kernel = np.ones(window)
    return np.convolve(values, kernel, mode="same") / np.convolve(np.ones_like(values), kernel, mode="same")


def _bucket_colors(count: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["viridis_r"]
    return [cmap(0.1 + 0.85 * index / max(count - 1, 1)) for index in range(count)]


def _runs(run: Run, baseline: Optional[Run]) -> list[tuple[Run, str]]:
    return [(run, RUN_COLOR)] + ([(baseline, BASELINE_COLOR)] if baseline is not None else [])


def _finish(axes: Any) -> None:
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)


def _figure(columns: int = 1) -> tuple[Any, Any]:
    figure_class = _require_matplotlib()
    figure = figure_class(figsize=(6.4 * columns, 4.4), layout="constrained")
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
def _needs_loss(run: Run) -> Optional[str]:
    return None if loss_name(run) else f"no training loss ({' / '.join(LOSS_NAMES[:3])}...) in {run.source}"


def _needs(*names: str) -> Callable[[Run], Optional[str]]:
    def check(run: Run) -> Optional[str]:
        missing = [name for name in names if not run.has(name)]
        return f"no {', '.join(f'`{name}`' for name in missing)} in {run.source}" if missing else None

    return check


def _needs_staleness(run: Run) -> Optional[str]:
    if staleness_fractions(run) or run.has(STALENESS_MEAN):
        return None
    return f"no `{STALENESS_FRACTION_PREFIX}*` and no `{STALENESS_MEAN}` in {run.source}"


PLOTS: tuple[tuple[str, Callable[[Run, Optional[Run], Path], Path], Callable[[Run], Optional[str]]], ...] = (
    ("loss.png", plot_loss, _needs_loss),
    ("val_accuracy.png", plot_validation_accuracy, _needs(VAL_ACC)),
    ("throughput.png", plot_throughput, _needs(SAMPLES_PER_SECOND)),
    ("staleness.png", plot_staleness, _needs_staleness),
)


def write_report(
    log_dir: Path,
    out: Optional[Path] = None,
    baseline_dir: Optional[Path] = None,
    label: str = "PD-ASGD",
    baseline_label: str = "baseline",
) -> Report:
    """Write every plot the newest run under ``log_dir`` has metrics for; ``out`` defaults to ``<run>/report``."""
    run = read_run(log_dir, label)
    baseline = read_run(baseline_dir, baseline_label) if baseline_dir is not None else None
    run_folder = run.source.parent if run.log_format == "csv" else run.source
    out = out if out is not None else run_folder / "report"
    report = Report(run=run, baseline=baseline)
    _require_matplotlib()
    out.mkdir(parents=True, exist_ok=True)
    for name, plot, needs in PLOTS:
        reason = needs(run)
        if reason:
            report.skipped.append(f"skipped {name}: {reason}")
            continue
        report.written.append(plot(run, baseline, out / name))
    return report


def parse_args(argv: list[str], prog: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=prog, description="PNG plots of a run from its CSVLogger metrics.csv or TensorBoard event files."
    )
    parser.add_argument("log_dir", type=Path, help="a logger's save_dir, run or version folder (searched recursively)")
    parser.add_argument("--out", type=Path, default=None, help="folder for the PNGs (default: <version folder>/report)")
    parser.add_argument("--baseline", type=Path, default=None,
                        help="the log folder of a run to compare with, e.g. plain Lightning; drawn on the same axes")
    parser.add_argument("--label", default="PD-ASGD", help="the run's name in the legends (default: PD-ASGD)")
    parser.add_argument("--baseline-label", default="baseline",
                        help="the baseline's name in the legends (default: baseline)")  # fmt: skip
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None, prog: str = "lightning-pdasgd report") -> int:
    """Run the report command; returns the exit code (2: no log found, 1: nothing could be plotted)."""
    args = parse_args(sys.argv[1:] if argv is None else argv, prog)
    try:
        report = write_report(args.log_dir, args.out, args.baseline, args.label, args.baseline_label)
    except ReportError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return error.exit_code
    print(f"read {report.run.source} ({report.run.log_format})")
    if report.baseline is not None:
        print(f"baseline {report.baseline.source} ({report.baseline.log_format})")
    for message in report.skipped:
        print(message, file=sys.stderr)
    for path in report.written:
        print(f"wrote {path}")
    if not report.written:
        print(f"{prog}: error: nothing to plot in {report.run.source}", file=sys.stderr)
        return EXIT_NOTHING_PLOTTED
    return EXIT_OK
