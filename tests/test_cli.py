"""LightningCLI runs of the main example, in a subprocess, with both yaml spellings of the strategy."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "digits.py"

BY_NAME = """
trainer:
  strategy: pdasgd
"""

BY_CLASS_PATH = """
trainer:
  strategy:
    class_path: lightning_pdasgd.PDASGDStrategy
    init_args:
      backward_threads: 3
      max_in_flight: 4
      layerwise: false
"""


def _run(tmp_path: Path, config: str, *extra: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "config.yaml"
    path.write_text(config)
    command = [
        sys.executable, str(EXAMPLE), "fit", "--config", str(path),
        "--trainer.max_epochs", "3", "--trainer.default_root_dir", str(tmp_path),
        "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(tmp_path),
        "--trainer.enable_progress_bar", "false", *extra,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=tmp_path)


@pytest.mark.parametrize("config", [BY_NAME, BY_CLASS_PATH], ids=["strategy-name", "class-path"])
def test_cli_trains_from_yaml(tmp_path: Path, config: str) -> None:
    result = _run(tmp_path, config)
    assert result.returncode == 0, result.stderr[-3000:]
    accuracy = float(result.stdout.split("final validation accuracy:")[-1])
    assert accuracy >= 0.9
    (metrics,) = tmp_path.rglob("metrics.csv")
    header = metrics.read_text().splitlines()[0]
    assert "pdasgd/staleness_mean" in header and "val_acc" in header
    assert list(tmp_path.rglob("*.ckpt")), "ModelCheckpoint wrote no checkpoint"
    saved_config = next(tmp_path.rglob("config.yaml")).read_text()
    assert "lightning_pdasgd.PDASGDStrategy" in saved_config or "pdasgd" in saved_config


def test_cli_rejects_bad_strategy_value(tmp_path: Path) -> None:
    result = _run(tmp_path, BY_CLASS_PATH, "--trainer.strategy.init_args.backward_threads", "0")
    assert result.returncode != 0
    assert "backward_threads" in result.stderr


def test_cli_rejects_unknown_strategy_key(tmp_path: Path) -> None:
    result = _run(tmp_path, BY_CLASS_PATH.replace("layerwise: false", "layerwize: false"))
    assert result.returncode != 0
    assert "layerwize" in result.stderr
