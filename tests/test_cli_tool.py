"""The ``lightning-pdasgd`` command (console script and ``python -m lightning_pdasgd``): LightningCLI + PD-ASGD."""

from __future__ import annotations

import inspect
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lightning_pdasgd import PDASGDStrategy
from lightning_pdasgd.cli import main as cli
from lightning_pdasgd.errors import ConfigurationError

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
    assert STRATEGY_DEFAULTS["backward_threads"] is None  # the default count: 2, fitted to the cores on a CPU
    assert "(type: Union[int, Literal['auto'], null], default: null)" in text and "default 2" in text
    assert len(re.sub(r"\(type:.*?\)", "", text).split()) >= 3, f"no help text for backward_threads: {text!r}"


def run_main(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """``cli.main(args)`` -> (exit code, stderr); parse errors exit through SystemExit, build errors return."""
    try:
        code = cli.main(args)
    except SystemExit as exit_info:
        code = exit_info.code if isinstance(exit_info.code, int) else 1
    return code, capsys.readouterr().err


def assert_short_error(err: str, *expected: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) <= 8, f"{len(lines)} lines:\n{err}"
    assert "Traceback" not in err and "usage:" not in err, err
    assert lines[0].startswith("lightning-pdasgd fit: error:"), err
    for text in expected:
        assert text in err, f"{text!r} not in:\n{err}"


def config_with(tmp_path: Path, old: str, new: str) -> Path:
    config = tmp_path / "edited.yaml"
    text = DIGITS_CLI.read_text()
    assert old in text
    config.write_text(text.replace(old, new))
    return config


NONFINITE_SKIPP = ("layerwise: true", "layerwise: true\n      nonfinite: skipp")
BAD_VALUES = {  # id: (yaml edit or None, extra arguments, what the message must contain)
    "backward_threads 0 (command line)": (
        None, ["--trainer.strategy.init_args.backward_threads", "0"],
        ["`trainer.strategy.init_args.backward_threads` = 0", "must be an integer >= 1"],
    ),
    "backward_threads 0 (yaml)": (
        ("backward_threads: null", "backward_threads: 0"), [],
        ["`trainer.strategy.init_args.backward_threads` = 0", "must be an integer >= 1"],
    ),
    "nonfinite skipp (yaml)": (
        NONFINITE_SKIPP, [], ["`trainer.strategy.init_args.nonfinite` = 'skipp'", "('error', 'skip', 'off')"],
    ),
    "backward_threads abc (wrong type)": (
        None, ["--trainer.strategy.init_args.backward_threads", "abc"],
        ["`trainer.strategy.init_args.backward_threads` = abc", "allowed: 'auto' or an int"],
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_bad_value_is_a_short_error_naming_key_value_and_allowed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    edit, extra, expected = BAD_VALUES[case]
    config = config_with(tmp_path, *edit) if edit else DIGITS_CLI
    code, err = run_main([*quiet_fit_args(tmp_path, config), *extra], capsys)
    assert code == 2
    assert_short_error(err, *expected)
    assert not list(tmp_path.rglob("metrics.csv")), "training started despite the bad value"


@pytest.mark.parametrize("where", ["yaml", "command line", "short flag"])
def test_unknown_strategy_key_is_a_short_error_with_the_close_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str
) -> None:
    if where == "yaml":
        args = quiet_fit_args(tmp_path, config_with(tmp_path, "layerwise: true", "layerwize: true"))
    else:
        flag = "--trainer.strategy.init_args.layerwize" if where == "command line" else "--trainer.strategy.layerwize"
        args = [*quiet_fit_args(tmp_path), flag, "true"]
    code, err = run_main(args, capsys)
    assert code == 2
    assert_short_error(
        err,
        "unknown key `trainer.strategy.init_args.layerwize` = true",
        "did you mean `trainer.strategy.init_args.layerwise`?",
        "allowed: forward_threads, backward_threads, max_in_flight, layerwise,",
    )


def test_unknown_trainer_key_suggests_the_right_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run_main([*quiet_fit_args(tmp_path), "--trainr.max_epochs", "3"], capsys)
    assert code == 2
    assert_short_error(err, "unknown key `trainr.max_epochs` = 3", "did you mean `trainer.max_epochs`?")


def test_console_script_prints_the_short_error_and_no_traceback(tmp_path: Path) -> None:
    """The installed command end to end: all a user sees on stderr for `nonfinite: skipp` in the yaml."""
    config = config_with(tmp_path, *NONFINITE_SKIPP)
    command = [console_script(), *quiet_fit_args(tmp_path, config)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "usage:" not in result.stderr, result.stderr
    error = result.stderr[result.stderr.index("lightning-pdasgd fit: error:") :]
    assert_short_error(error, "`trainer.strategy.init_args.nonfinite` = 'skipp'", "('error', 'skip', 'off')")


def test_run_cli_raises_a_configuration_error_with_the_original_as_cause(tmp_path: Path) -> None:
    """Callers of ``run_cli`` (scripts, tests) get an exception: the short message, the full error as its cause."""
    with pytest.raises(ConfigurationError, match="backward_threads") as error:
        cli.run_cli([*quiet_fit_args(tmp_path), "--trainer.strategy.init_args.backward_threads", "0"])
    assert isinstance(error.value, ValueError)
    assert "Does not validate against any of the Union subtypes" in str(error.value.__cause__)


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


def test_short_error_parser_in_a_plain_lightning_cli_script(tmp_path: Path) -> None:
    """What docs/cli-and-report.md offers to any LightningCLI script: `parser_class=ShortErrorParser`."""
    script = tmp_path / "train.py"
    script.write_text(
        "from lightning.pytorch.cli import LightningCLI\n"
        "from lightning.pytorch.demos.boring_classes import BoringDataModule, BoringModel\n"
        "from lightning_pdasgd.cli.errors import ShortErrorParser\n"
        "LightningCLI(BoringModel, BoringDataModule, parser_class=ShortErrorParser)\n"
    )
    command = [sys.executable, str(script), "fit", "--trainer.strategy", "PDASGDStrategy",
               "--trainer.strategy.layerwize", "true"]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) <= 8 and "usage:" not in result.stderr, result.stderr
    assert lines[0] == f"{script.name} fit: error: unknown key `trainer.strategy.init_args.layerwize` = true"
    assert "did you mean `trainer.strategy.init_args.layerwise`?" in result.stderr
