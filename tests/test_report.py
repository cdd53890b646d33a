"""``lightning-pdasgd report``: PNG plots from a real PD-ASGD run's CSVLogger metrics.csv."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import CSVLogger

from lightning_pdasgd import cli, report
from tests.helpers import trainer_kwargs
from tests.models import DigitsClassifier, DigitsData

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PLOTS = ("val_accuracy.png", "throughput.png", "staleness.png")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real 2-epoch PD-ASGD run on the digits, logged by CSVLogger every 5 steps; returns its save_dir."""
    save_dir = tmp_path_factory.mktemp("logs")
    trainer = Trainer(
        **trainer_kwargs(
            strategy="pdasgd", max_epochs=2, log_every_n_steps=5, logger=CSVLogger(save_dir, name="digits")
        )
    )
    trainer.fit(DigitsClassifier(), DigitsData())
    return save_dir


def assert_real_png(path: Path) -> None:
    from matplotlib.image import imread

    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    assert len(data) > 5_000, f"{path} is only {len(data)} bytes"
    pixels = imread(path)
    colors = np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0)
    assert len(colors) > 10, f"{path} has {len(colors)} distinct colors: an empty plot"


def test_report_writes_the_three_plots(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["report", str(run_dir), "--out", str(tmp_path / "out")]) == 0
    for name in PLOTS:
        assert_real_png(tmp_path / "out" / name)
    out = capsys.readouterr().out
    assert "metrics.csv" in out and all(name in out for name in PLOTS)


def test_report_defaults_to_a_folder_beside_the_metrics(run_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "logs"
    shutil.copytree(run_dir, copy)
    assert report.main([str(copy)]) == 0
    (metrics,) = copy.rglob("metrics.csv")
    assert sorted(path.name for path in (metrics.parent / "report").iterdir()) == sorted(PLOTS)


def test_newest_run_is_reported_and_plots_without_columns_are_skipped(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (real,) = run_dir.rglob("metrics.csv")
    old = tmp_path / "logs" / "a" / "version_7" / "metrics.csv"
    new = tmp_path / "logs" / "b" / "version_0" / "metrics.csv"
    for path in (old, new):
        path.parent.mkdir(parents=True)
    shutil.copy(real, old)
    new.write_text("epoch,step,val_acc,val_loss\n0,44,0.81,0.6\n1,89,0.9,0.3\n")
    os.utime(old, (1_000_000, 1_000_000))  # older than `new`, although its version number is higher

    assert report.main([str(tmp_path / "logs"), "--out", str(tmp_path / "out")]) == 0
    assert [path.name for path in (tmp_path / "out").iterdir()] == ["val_accuracy.png"]
    captured = capsys.readouterr()
    assert str(new) in captured.out
    assert "skipped throughput.png" in captured.err and "pdasgd/samples_per_sec" in captured.err
    assert "skipped staleness.png" in captured.err and "pdasgd/staleness_mean" in captured.err


def test_no_metrics_csv_exits_2_naming_the_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty_run").mkdir()
    assert cli.main(["report", str(tmp_path / "empty_run")]) == 2
    assert f"No metrics.csv found under '{tmp_path / 'empty_run'}'" in capsys.readouterr().err
    assert cli.main(["report", str(tmp_path / "no_such_run")]) == 2
    assert f"'{tmp_path / 'no_such_run'}' is not a directory" in capsys.readouterr().err


def test_nothing_to_plot_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "metrics.csv").write_text("epoch,step,train_loss\n0,4,1.2\n")
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
    x, y, label = report.validation_accuracy_series(report.read_metrics(path))
    assert label == "wall time (s)"
    np.testing.assert_allclose(x, [3.0, 7.5])
    np.testing.assert_allclose(y, [0.5, 0.75])

    path.write_text("epoch,step,val_acc\n0,14,0.5\n1,29,0.75\n")
    x, _, label = report.validation_accuracy_series(report.read_metrics(path))
    assert label.startswith("step") and "pdasgd/wall_time_s" in label
    np.testing.assert_allclose(x, [14, 29])


def test_missing_matplotlib_is_a_clear_error(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what `import matplotlib` sees when it is not installed
    assert report.main([str(run_dir), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "needs matplotlib" in err and "pip install 'lightning-pdasgd[examples]'" in err
    assert not (tmp_path / "out").exists()
