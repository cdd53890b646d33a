"""The ``lightning-pdasgd`` command (console script and ``python -m lightning_pdasgd``): LightningCLI + PD-ASGD."""

from __future__ import annotations

import inspect
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lightning_pdasgd import PDASGDStrategy, cli

ROOT = Path(__file__).resolve().parents[1]
DIGITS_CLI = ROOT / "examples" / "configs" / "digits_cli.yaml"
STRATEGY_DEFAULTS = {
    name: parameter.default
    for name, parameter in inspect.signature(PDASGDStrategy.__init__).parameters.items()
    if name in ("forward_threads", "backward_threads", "max_in_flight", "layerwise", "wait_timeout")
}


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    """LightningCLI warns when it gets ``args`` while ``sys.argv`` has arguments (pytest's own)."""
    monkeypatch.setattr(sys, "argv", ["lightning-pdasgd"])


def console_script() -> str:
    script = shutil.which("lightning-pdasgd", path=str(Path(sys.executable).parent)) or shutil.which("lightning-pdasgd")
    assert script, "the `lightning-pdasgd` console script is not installed: run `pip install -e .`"
    return script


def quiet_fit_args(tmp_path: Path, config: Path = DIGITS_CLI) -> list[str]:
    return [
        "fit", "--config", str(config), "--trainer.max_epochs", "2",
        "--trainer.logger.save_dir", str(tmp_path), "--trainer.default_root_dir", str(tmp_path),
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
    ]  # fmt: skip


def test_console_script_trains_from_yaml(tmp_path: Path) -> None:
    """The installed script, run from the repository root, resolves `examples.digits.*` and trains under PD-ASGD."""
    command = [console_script(), *quiet_fit_args(tmp_path), "--trainer.strategy.init_args.backward_threads", "3"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    accuracy = float(result.stdout.split("final validation accuracy:")[-1])
    assert accuracy >= 0.9
    (metrics,) = tmp_path.rglob("metrics.csv")
    header = metrics.read_text().splitlines()[0].split(",")
    assert {"val_acc", "pdasgd/staleness_mean", "pdasgd/samples_per_sec"} <= set(header)
    assert list(metrics.parent.rglob("*.ckpt")), "ModelCheckpoint wrote no checkpoint"
    saved = yaml.safe_load((metrics.parent / "config.yaml").read_text())
    assert saved["trainer"]["strategy"]["class_path"] == "lightning_pdasgd.PDASGDStrategy"
    assert saved["trainer"]["strategy"]["init_args"]["backward_threads"] == 3  # the command-line override won
    assert saved["model"]["class_path"] == "examples.digits.DigitsClassifier"


def test_module_entry_point_prints_strategy_defaults(tmp_path: Path) -> None:
    """`python -m lightning_pdasgd fit --print_config` lists the default strategy's arguments with their defaults."""
    command = [sys.executable, "-m", "lightning_pdasgd", "fit", "--print_config"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    strategy = yaml.safe_load(result.stdout)["trainer"]["strategy"]
    assert strategy["class_path"] == "lightning_pdasgd.PDASGDStrategy"
    for name, default in STRATEGY_DEFAULTS.items():
        assert strategy["init_args"][name] == default, name


def test_strategy_help_shows_each_argument_with_help_and_default(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["fit", "--trainer.strategy.help", "PDASGDStrategy"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    block = out.split("--trainer.strategy.backward_threads BACKWARD_THREADS\n", 1)[1].split("\n  --", 1)[0]
    text = " ".join(block.split())
    assert f"(type: Union[int, Literal['auto']], default: {STRATEGY_DEFAULTS['backward_threads']})" in text
    assert len(re.sub(r"\(type:.*?\)", "", text).split()) >= 3, f"no help text for backward_threads: {text!r}"


def test_bad_strategy_value_fails_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(DIGITS_CLI.read_text().replace("backward_threads: 2", "backward_threads: 0"))
    with pytest.raises(ValueError, match="backward_threads"):
        cli.main(quiet_fit_args(tmp_path, config))


@pytest.mark.parametrize("where", ["yaml", "command line"])
def test_unknown_strategy_key_fails_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str
) -> None:
    config = tmp_path / "typo.yaml"
    if where == "yaml":
        config.write_text(DIGITS_CLI.read_text().replace("layerwise: true", "layerwize: true"))
        extra = []
    else:
        config.write_text(DIGITS_CLI.read_text())
        extra = ["--trainer.strategy.init_args.layerwize", "true"]
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*quiet_fit_args(tmp_path, config), *extra])
    assert exit_info.value.code != 0
    assert "layerwize" in capsys.readouterr().err


def test_models_in_the_working_directory_resolve_by_class_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "my_models_for_cli_test.py").write_text(
        "from lightning.pytorch.demos.boring_classes import BoringModel\n\nclass MyModel(BoringModel):\n    pass\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [entry for entry in sys.path if entry not in ("", str(tmp_path))])
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["fit", "--model", "my_models_for_cli_test.MyModel", "--print_config"])
    assert exit_info.value.code == 0
    assert yaml.safe_load(capsys.readouterr().out)["model"]["class_path"] == "my_models_for_cli_test.MyModel"
    sys.modules.pop("my_models_for_cli_test", None)
