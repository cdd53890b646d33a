"""Smoke tests of the examples, through their yaml configs and the ``lightning-pdasgd`` command, in seconds."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Trainer
from torch import nn

from examples.cifar10_resnet import CIFAR10DataModule, cifar_resnet18, train_transform
from examples.sequence_classifier import SequenceClassifier, SequenceDataModule, read_tsv
from lightning_pdasgd import PDASGDStrategy
from lightning_pdasgd.cli import main as cli
from tests.helpers import trainer_kwargs

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "examples" / "configs"
CSV_LOGGER = "lightning.pytorch.loggers.CSVLogger"
CLI_CONFIGS = [
    "digits_cli.yaml",
    "cifar10_resnet18_1gpu.yaml",
    "cifar10_resnet18_ngpu.yaml",
    "sequence_classifier.yaml",
    "char_gpt.yaml",
]


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    """LightningCLI warns when it gets ``args`` while ``sys.argv`` has arguments (pytest's own)."""
    monkeypatch.setattr(sys, "argv", ["lightning-pdasgd"])


def fit_args(config: str, tmp_path: Path, *overrides: str) -> list[str]:
    return [
        "fit", "--config", str(CONFIGS / config), "--trainer.logger.save_dir", str(tmp_path),
        "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", *overrides,
    ]  # fmt: skip


def printed_config(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*args, "--print_config"])
    assert exit_info.value.code == 0
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("config", CLI_CONFIGS)
def test_cli_configs_parse_with_the_pdasgd_strategy(config: str, capsys: pytest.CaptureFixture[str]) -> None:
    parsed = printed_config(capsys, "fit", "--config", str(CONFIGS / config))
    assert parsed["trainer"]["strategy"]["class_path"] == "lightning_pdasgd.PDASGDStrategy"
    assert parsed["model"]["class_path"].startswith("examples.")
    assert parsed["data"]["class_path"].startswith("examples.")


def test_cifar10_gpu_configs_ask_for_one_and_for_all_gpus(capsys: pytest.CaptureFixture[str]) -> None:
    one = printed_config(capsys, "fit", "--config", str(CONFIGS / "cifar10_resnet18_1gpu.yaml"))["trainer"]
    every = printed_config(capsys, "fit", "--config", str(CONFIGS / "cifar10_resnet18_ngpu.yaml"))["trainer"]
    assert (one["accelerator"], one["devices"]) == ("gpu", 1)
    assert (every["accelerator"], every["devices"]) == ("gpu", -1)


@pytest.mark.parametrize(
    "flag", ["--trainer.strategy.backward_threads", "--trainer.strategy.init_args.backward_threads"]
)
def test_digits_script_sets_strategy_arguments_from_the_command_line(
    flag: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The commands in digits.py's docstring and the README: the default strategy takes its arguments by flag."""
    from examples.digits import main

    monkeypatch.setattr(sys, "argv", ["digits.py", "fit", flag, "3", "--print_config"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 0
    strategy = yaml.safe_load(capsys.readouterr().out)["trainer"]["strategy"]
    assert strategy["class_path"] == "lightning_pdasgd.PDASGDStrategy"
    assert strategy["init_args"]["backward_threads"] == 3


@pytest.mark.parametrize("config", sorted(path.name for path in CONFIGS.glob("*.yaml")))
def test_every_example_config_logs_with_csv_logger(config: str) -> None:
    """The README's promise: `lightning-pdasgd report lightning_logs/<name>` works after any example config."""
    logger = yaml.safe_load((CONFIGS / config).read_text())["trainer"]["logger"]
    assert logger["class_path"] == CSV_LOGGER
    assert logger["init_args"]["save_dir"] == "lightning_logs" and logger["init_args"]["name"]


def test_readme_first_command_then_report(tmp_path: Path) -> None:
    """`python examples/digits.py fit`, then the README's `lightning-pdasgd report lightning_logs/digits`, as a
    user runs them (in a fresh folder: the logs land under ./lightning_logs)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    fit = [sys.executable, str(ROOT / "examples" / "digits.py"), "fit", "--trainer.max_epochs", "2",
           "--trainer.enable_progress_bar", "false"]  # fmt: skip
    result = subprocess.run(fit, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert float(result.stdout.split("final validation accuracy:")[-1]) >= 0.9
    script = shutil.which("lightning-pdasgd", path=str(Path(sys.executable).parent))
    assert script, "the `lightning-pdasgd` console script is not installed: run `pip install -e .`"
    result = subprocess.run([script, "report", "lightning_logs/digits"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=240)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (metrics,) = (tmp_path / "lightning_logs" / "digits").rglob("metrics.csv")
    written = sorted(path.name for path in (metrics.parent / "report").iterdir())
    assert written == ["loss.png", "staleness.png", "throughput.png", "val_accuracy.png"], result.stderr
    assert all((metrics.parent / "report" / name).stat().st_size > 5_000 for name in written)


# ------------------------------------------------------------------------------------------------- CIFAR-10
def test_cifar10_config_trains_on_synthetic_data(tmp_path: Path) -> None:
    """The 1-GPU config, moved to the CPU, on 2 synthetic batches: the whole pipeline runs and logs."""
    run = cli.run_cli(
        fit_args(
            "cifar10_resnet18_1gpu.yaml", tmp_path,
            "--trainer.accelerator", "cpu", "--trainer.precision", "32-true", "--trainer.max_epochs", "1",
            "--trainer.log_every_n_steps", "1", "--data.synthetic", "true", "--data.batch_size", "4",
            "--data.synthetic_batches", "2",
        )
    )  # fmt: skip
    assert isinstance(run.trainer.strategy, PDASGDStrategy)
    assert run.trainer.global_step == 2
    (metrics,) = tmp_path.rglob("metrics.csv")
    header = metrics.read_text().splitlines()[0].split(",")
    assert {"val_acc", "train_loss", "pdasgd/samples_per_sec"} <= set(header)
    assert list(tmp_path.rglob("*.ckpt"))


def test_cifar10_missing_data_is_a_clear_error_and_nothing_is_downloaded(tmp_path: Path) -> None:
    data = CIFAR10DataModule(data_dir=str(tmp_path))
    data.prepare_data()
    with pytest.raises(FileNotFoundError) as error:
        data.setup("fit")
    message = str(error.value)
    assert str(tmp_path.resolve()) in message and "cifar-10-batches-py" in message
    assert "--data.download true" in message
    assert list(tmp_path.iterdir()) == []


def test_cifar10_resnet18_has_the_32x32_stem_and_augmentation() -> None:
    from PIL import Image

    model = cifar_resnet18()
    assert (model.conv1.kernel_size, model.conv1.stride) == ((3, 3), (1, 1))
    assert isinstance(model.maxpool, nn.Identity)
    assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    image = Image.fromarray(torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8).numpy())
    torch.manual_seed(0)
    views = torch.stack([train_transform()(image) for _ in range(4)])
    assert views.shape == (4, 3, 32, 32)
    assert not torch.equal(views[0], views[1]), "the augmentation does not change the image"


# ------------------------------------------------------------------------------------------------- Transformer
def test_char_gpt_config_learns_and_prints_a_sample(tmp_path: Path) -> None:
    """The Transformer recipe (AdamW, warm-up + cosine, clipping by norm) through the CLI, shortened: the loss falls
    well below the uniform guess over 128 symbols (ln 128 = 4.85) and a sample is generated."""
    run = cli.run_cli(
        fit_args(
            "char_gpt.yaml", tmp_path,
            "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "60", "--trainer.limit_val_batches", "4",
            "--data.max_chars", "150000", "--model.sample_chars", "40",
        )
    )  # fmt: skip
    assert isinstance(run.trainer.strategy, PDASGDStrategy)
    assert run.trainer.gradient_clip_val == 1.0 and run.trainer.global_step == 60
    assert float(run.trainer.callback_metrics["val_loss"]) < 3.3
    assert run.model.sample.startswith("def ") and len(run.model.sample) == 44


# ------------------------------------------------------------------------------------------------- sequences
def test_sequence_classifier_learns_the_synthetic_task(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cli.main(
        fit_args(
            "sequence_classifier.yaml", tmp_path,
            "--trainer.max_epochs", "2", "--data.synthetic_size", "1000", "--data.batch_size", "32",
        )
    )  # fmt: skip
    accuracy = float(capsys.readouterr().out.split("final validation accuracy:")[-1])
    assert accuracy >= 0.9, "chance is 0.5"
    (checkpoint,) = tmp_path.rglob("*.ckpt")
    restored = SequenceClassifier.load_from_checkpoint(checkpoint)
    assert restored.hparams.vocab_size == 18 and restored.hparams.num_classes == 2


def write_review_file(path: Path, lines: int, seed: int = 0) -> None:
    """A word-level task: the label is `pos` when the text has the word `great` (labels are strings)."""
    rng = random.Random(seed)
    words = ["the", "film", "was", "plot", "actors", "music", "long", "short", "some", "very"]
    rows = ["# label<TAB>text", ""]
    for index in range(lines):
        text = [rng.choice(words) for _ in range(rng.randint(3, 12))]
        if index % 2:
            text.insert(rng.randrange(len(text) + 1), "great")
        rows.append(f"{'pos' if index % 2 else 'neg'}\t{' '.join(text)}")
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")


def test_sequence_classifier_trains_on_a_tsv_file(tmp_path: Path) -> None:
    path = tmp_path / "reviews.tsv"
    write_review_file(path, lines=400)
    data = SequenceDataModule(train_file=str(path), tokenizer="word", batch_size=32, val_fraction=0.2)
    model = SequenceClassifier(lr=0.02)
    trainer = Trainer(**trainer_kwargs(strategy="pdasgd", max_epochs=4))
    trainer.fit(model, data)
    assert data.labels == ["neg", "pos"]
    assert data.vocab_size == 2 + 11  # <pad>, <unk> and the 11 words
    assert (len(data.train_set), len(data.val_set)) == (320, 80)
    assert float(trainer.callback_metrics["val_acc"]) >= 0.9


def test_sequence_file_errors_name_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.tsv"
    path.write_text("pos\tgood\n\nneg bad, no tab here\n", encoding="utf-8")
    with pytest.raises(ValueError, match=f"{path}:3: expected `label<TAB>text`"):
        read_tsv(path)
    with pytest.raises(FileNotFoundError, match="missing.tsv"):
        SequenceDataModule(train_file=str(tmp_path / "missing.tsv")).setup("fit")
