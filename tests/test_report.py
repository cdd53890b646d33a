"""``lightning-pdasgd report``: PNG plots from real runs logged by CSVLogger and by TensorBoardLogger."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from lightning_pdasgd import PDASGDStrategy
from lightning_pdasgd.cli import main as cli
from lightning_pdasgd.cli import report
from tests.helpers import trainer_kwargs
from tests.models import DigitsClassifier, DigitsData

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PLOTS = ("loss.png", "val_accuracy.png", "throughput.png", "staleness.png")
ORANGE = np.array([1.0, 0.498, 0.055])  # matplotlib's tab:orange, the baseline's color
EPOCHS = 2


def fit_digits(save_dir: Path, logger_class: type, strategy: Any = None) -> Path:
    """A real 2-epoch run on the digits, logged every 5 steps (every engine metric); returns the logger's save_dir."""
    strategy = PDASGDStrategy(metrics="full") if strategy is None else strategy
    logger = logger_class(save_dir, name="digits")
    trainer = Trainer(**trainer_kwargs(strategy=strategy, max_epochs=EPOCHS, log_every_n_steps=5, logger=logger))
    trainer.fit(DigitsClassifier(), DigitsData())
    return save_dir


@pytest.fixture(scope="module")
def csv_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fit_digits(tmp_path_factory.mktemp("csv"), CSVLogger)


@pytest.fixture(scope="module")
def tensorboard_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fit_digits(tmp_path_factory.mktemp("tensorboard"), TensorBoardLogger)


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The baseline: the same model and data under plain Lightning (no pdasgd/ metrics at all)."""
    return fit_digits(tmp_path_factory.mktemp("plain"), TensorBoardLogger, strategy="auto")


def assert_real_png(path: Path) -> np.ndarray:
    from matplotlib.image import imread

    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    assert len(data) > 5_000, f"{path} is only {len(data)} bytes"
    pixels = imread(path)
    colors = np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0)
    assert len(colors) > 10, f"{path} has {len(colors)} distinct colors: an empty plot"
    return pixels


def orange_pixels(path: Path) -> int:
    from matplotlib.image import imread

    rgb = imread(path)[..., :3]
    return int((np.abs(rgb - ORANGE).max(axis=-1) < 0.08).sum())


@pytest.mark.parametrize("log", ["csv_run", "tensorboard_run"])
def test_report_writes_the_four_plots(
    log: str, request: pytest.FixtureRequest, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = request.getfixturevalue(log)
    assert cli.main(["report", str(run_dir), "--out", str(tmp_path / "out")]) == 0
    for name in PLOTS:
        assert_real_png(tmp_path / "out" / name)
    out = capsys.readouterr().out
    assert ("(csv)" if log == "csv_run" else "(tensorboard)") in out
    assert all(name in out for name in PLOTS)


@pytest.mark.parametrize("log", ["csv_run", "tensorboard_run"])
def test_both_formats_give_the_loss_epochs_and_clock(log: str, request: pytest.FixtureRequest) -> None:
    run = report.read_run(request.getfixturevalue(log))
    assert run.log_format == ("csv" if log == "csv_run" else "tensorboard")
    assert report.loss_name(run) == "train_loss_step"
    loss = run.get("train_loss_step")
    assert len(loss.values) >= 10 and np.all(np.diff(loss.steps) > 0)
    assert loss.values[-3:].mean() < loss.values[:3].mean(), "the loss did not fall: not the run's loss"
    # one boundary between the 2 epochs, at the step where epoch 0's validation was logged
    val_steps = run.get("val_acc").steps
    np.testing.assert_array_equal(run.epoch_boundaries(), val_steps[:1])
    assert report.staleness_fractions(run) == [
        f"pdasgd/staleness_frac_{bucket}" for bucket in ("0", "1", "2", "3-4", "5-8", "9+")
    ]
    seconds = run.clock("val_acc")
    assert seconds is not None and 0 < seconds[0] < seconds[-1]


def test_both_formats_read_the_same_steps(csv_run: Path, tensorboard_run: Path) -> None:
    from_csv, from_events = report.read_run(csv_run), report.read_run(tensorboard_run)
    for name in ("train_loss_step", "val_acc", "epoch"):
        np.testing.assert_array_equal(np.unique(from_csv.get(name).steps), np.unique(from_events.get(name).steps))


def test_baseline_is_drawn_on_the_same_axes(
    csv_run: Path, plain_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A plain Lightning run (TensorBoard, no pdasgd/ metrics) beside ours: in the loss and accuracy plots, and on
    the wall-time axis through its events' timestamps."""
    alone, both = tmp_path / "alone", tmp_path / "both"
    assert report.main([str(csv_run), "--out", str(alone)]) == 0
    args = [str(csv_run), "--out", str(both), "--baseline", str(plain_run), "--baseline-label", "plain Lightning"]
    assert report.main(args) == 0
    assert "(tensorboard)" in capsys.readouterr().out.split("baseline", 1)[1]
    for name in ("loss.png", "val_accuracy.png"):
        assert_real_png(both / name)
        assert orange_pixels(alone / name) == 0
        assert orange_pixels(both / name) > 300, f"no baseline curve in {name}"
    baseline = report.read_run(plain_run)
    assert baseline.clock("val_acc") is not None and not baseline.has(report.WALL_TIME)


def test_report_defaults_to_a_folder_beside_the_metrics(csv_run: Path, tmp_path: Path) -> None:
    copy = tmp_path / "logs"
    shutil.copytree(csv_run, copy)
    assert report.main([str(copy)]) == 0
    (metrics,) = copy.rglob("metrics.csv")
    assert sorted(path.name for path in (metrics.parent / "report").iterdir()) == sorted(PLOTS)


def test_newest_run_is_reported_and_plots_without_metrics_are_skipped(
    csv_run: Path, tensorboard_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (real,) = csv_run.rglob("metrics.csv")
    old = tmp_path / "logs" / "a" / "version_7" / "metrics.csv"
    events = tmp_path / "logs" / "tb" / "version_9"
    new = tmp_path / "logs" / "b" / "version_0" / "metrics.csv"
    for path in (old, new):
        path.parent.mkdir(parents=True)
    shutil.copy(real, old)
    shutil.copytree(next(tensorboard_run.rglob("events.out.tfevents.*")).parent, events)
    new.write_text("epoch,step,val_acc,val_loss\n0,44,0.81,0.6\n1,89,0.9,0.3\n")
    for path in (old, *events.iterdir()):  # older than `new`, although their version numbers are higher
        os.utime(path, (1_000_000, 1_000_000))

    assert report.main([str(tmp_path / "logs"), "--out", str(tmp_path / "out")]) == 0
    assert [path.name for path in (tmp_path / "out").iterdir()] == ["val_accuracy.png"]
    captured = capsys.readouterr()
    assert str(new) in captured.out
    assert "skipped loss.png: no training loss" in captured.err
    assert "skipped throughput.png" in captured.err and "pdasgd/samples_per_sec" in captured.err
    assert "skipped staleness.png" in captured.err and "pdasgd/staleness_mean" in captured.err


def test_no_log_exits_2_naming_the_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty_run").mkdir()
    assert cli.main(["report", str(tmp_path / "empty_run")]) == 2
    err = capsys.readouterr().err
    assert "No metrics.csv and no TensorBoard event file (events.out.tfevents.*)" in err
    assert f"found under '{tmp_path / 'empty_run'}'" in err
    assert cli.main(["report", str(tmp_path / "no_such_run")]) == 2
    assert f"'{tmp_path / 'no_such_run'}' is not a directory" in capsys.readouterr().err


def test_nothing_to_plot_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "metrics.csv").write_text("epoch,step,my_metric\n0,4,1.2\n")
    assert report.main([str(tmp_path)]) == 1
    assert "nothing to plot" in capsys.readouterr().err


def test_validation_accuracy_uses_wall_time_when_logged(tmp_path: Path) -> None:
    path = tmp_path / "metrics.csv"
    path.write_text(
        "epoch,step,pdasgd/wall_time_s,val_acc\n"
        "0,9,2.0,\n"
        "0,19,4.0,\n"
        "0,14,,0.5\n"  # validation between two timed steps: interpolated
        "1,29,7.5,0.75\n"  # a validation row that carries its own wall time
    )
    x, y, label = report.validation_accuracy_series(report.read_run(path))
    assert label == "wall time (s)"
    np.testing.assert_allclose(x, [3.0, 7.5])
    np.testing.assert_allclose(y, [0.5, 0.75])

    path.write_text("epoch,step,val_acc\n0,14,0.5\n1,29,0.75\n")
    x, _, label = report.validation_accuracy_series(report.read_run(path))
    assert label.startswith("step") and "pdasgd/wall_time_s" in label
    np.testing.assert_allclose(x, [14, 29])


def test_epoch_boundaries_are_the_last_step_of_each_epoch(tmp_path: Path) -> None:
    path = tmp_path / "metrics.csv"
    path.write_text("epoch,step,train_loss\n0,4,1\n0,9,1\n1,14,1\n1,19,1\n2,24,1\n")
    np.testing.assert_array_equal(report.read_run(path).epoch_boundaries(), [9, 19])


def test_missing_matplotlib_is_a_clear_error(
    csv_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what `import matplotlib` sees when it is not installed
    assert report.main([str(csv_run), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "needs matplotlib" in err and "pip install 'lightning-pdasgd[examples]'" in err
    assert not (tmp_path / "out").exists()


def test_missing_tensorboard_is_a_clear_error(
    tensorboard_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # what `import tensorboard` sees when it is not installed
    assert report.main([str(tensorboard_run), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "TensorBoard event files" in err and "pip install tensorboard" in err
    assert not (tmp_path / "out").exists()
