"""``strategy="pdasgd"`` with the standalone ``pytorch_lightning`` package, ``lightning``, or both (issue #12).

Each test runs ``tests/pl_compat_probe.py`` in a fresh interpreter so it controls what is imported, in which
order, and which package looks installed. With ``max_in_flight=1`` PD-ASGD must reproduce the plain run of the
same Trainer exactly; ``import lightning_pdasgd`` must not import a Lightning package the program does not use.
See ``tools/pl_compat_findings.md`` for what pytorch_lightning checks and the proposed design.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
PL = "pytorch_lightning"
LIGHTNING = "lightning.pytorch"

pytestmark = pytest.mark.skipif(
    any(__import__("importlib").util.find_spec(name) is None for name in ("pytorch_lightning", "lightning")),
    reason="needs both lightning and pytorch-lightning installed (the dev extras)",
)


def probe(imports: str, trainers: str = "", strategy: str = "name", uninstalled: str = "") -> dict[str, Any]:
    """Run the probe in a fresh interpreter that imports this checkout's lightning_pdasgd first on the path."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    command = [
        sys.executable,
        str(ROOT / "tests" / "pl_compat_probe.py"),
        "--imports",
        imports,
        "--trainers",
        trainers,
        "--strategy",
        strategy,
        "--uninstalled",
        uninstalled,
    ]
    done = subprocess.run(command, check=False, capture_output=True, text=True, env=env, timeout=240)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, f"probe failed ({done.returncode}):\n{done.stderr[-3000:]}"
    return json.loads(lines[-1][len("RESULT ") :])


def assert_trained(fit: dict[str, Any], package: str, exact: bool) -> None:
    """PD-ASGD ran (its updates were counted), as the package's own ParallelStrategy, silently, and right."""
    assert "error" not in fit, fit.get("error", "") + "\n" + fit.get("trace", "")
    assert fit["strategy_class"].endswith("PDASGDStrategy")
    assert fit["is_package_parallel_strategy"], f"not a {package}.strategies.ParallelStrategy: {fit['strategy_class']}"
    assert fit["global_step"] == 16 and fit["updates"] and fit["updates"] > 0
    assert fit["pdasgd_warnings"] == [], "a module that overrides no gradient hook gets no PD-ASGD warning"
    if exact:
        assert fit["max_difference_to_plain"] <= 1e-6
    else:
        assert fit["max_difference_to_plain"] < 1.0  # trained from the same start, not diverged


# ------------------------------------------------------------------------------------------- lightning
def test_lightning_only_imported() -> None:
    result = probe("lightning,lightning_pdasgd", LIGHTNING, strategy="instance")
    assert_trained(result["fits"][LIGHTNING], LIGHTNING, exact=True)
    assert not result["loaded"][PL], "import lightning_pdasgd must not import pytorch_lightning"


def test_lightning_only_installed_by_name() -> None:
    result = probe("lightning,lightning_pdasgd", LIGHTNING, strategy="name", uninstalled=PL)
    assert_trained(result["fits"][LIGHTNING], LIGHTNING, exact=False)


# ------------------------------------------------------------------------------------------- pytorch_lightning
def test_pytorch_lightning_only_imported_by_name() -> None:
    result = probe("pytorch_lightning,lightning_pdasgd", PL, strategy="name")
    assert_trained(result["fits"][PL], PL, exact=False)


def test_pytorch_lightning_only_imported_instance_matches_plain() -> None:
    result = probe("pytorch_lightning,lightning_pdasgd", PL, strategy="instance")
    assert_trained(result["fits"][PL], PL, exact=True)


def test_pytorch_lightning_program_does_not_import_lightning() -> None:
    result = probe("pytorch_lightning,lightning_pdasgd", PL, strategy="instance")
    assert result["imports"]["lightning_pdasgd"] == "ok"
    assert not result["loaded"]["lightning"], "'lightning' in sys.modules after a pytorch_lightning-only fit"


def test_pytorch_lightning_only_installed() -> None:
    result = probe("pytorch_lightning,lightning_pdasgd", PL, strategy="name", uninstalled="lightning")
    assert result["imports"]["lightning_pdasgd"] == "ok", result["imports"]["lightning_pdasgd"]
    assert_trained(result["fits"][PL], PL, exact=False)


def test_pytorch_lightning_imported_after_lightning_pdasgd() -> None:
    """``import lightning_pdasgd`` first, ``import pytorch_lightning`` later: the name must still resolve."""
    result = probe("lightning_pdasgd,pytorch_lightning", PL, strategy="name", uninstalled="lightning")
    assert_trained(result["fits"][PL], PL, exact=False)


# ------------------------------------------------------------------------------------------- both
def test_both_imported_each_trainer_by_name() -> None:
    result = probe("lightning,pytorch_lightning,lightning_pdasgd", f"{LIGHTNING},{PL}", strategy="name")
    assert_trained(result["fits"][LIGHTNING], LIGHTNING, exact=False)
    assert_trained(result["fits"][PL], PL, exact=False)


def test_both_imported_one_class_for_either_trainer() -> None:
    """``lightning_pdasgd.PDASGDStrategy(...)`` is accepted by both Trainers and reproduces each plain run."""
    result = probe("pytorch_lightning,lightning,lightning_pdasgd", f"{LIGHTNING},{PL}", strategy="instance")
    assert_trained(result["fits"][LIGHTNING], LIGHTNING, exact=True)
    assert_trained(result["fits"][PL], PL, exact=True)


def test_pytorch_lightning_cli_short_name_with_arguments(tmp_path: Path) -> None:
    """``pytorch_lightning.cli.LightningCLI``: ``--trainer.strategy pdasgd --trainer.strategy.<arg>`` resolves to the
    pytorch_lightning alias class, and the program still never imports ``lightning``."""
    script = tmp_path / "train.py"
    script.write_text(
        "import sys\n"
        "import lightning_pdasgd\n"
        "from pytorch_lightning.cli import LightningCLI\n"
        "from pytorch_lightning.demos.boring_classes import BoringDataModule, BoringModel\n"
        "cli = LightningCLI(BoringModel, BoringDataModule, save_config_kwargs={'overwrite': True})\n"
        "strategy = cli.trainer.strategy\n"
        "print('RESULT', type(strategy).__module__, strategy.backward_threads, cli.trainer.global_step,"
        " 'lightning' in sys.modules)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    command = [
        sys.executable, str(script), "fit", "--trainer.strategy", "pdasgd", "--trainer.strategy.backward_threads", "3",
        "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "4", "--trainer.limit_val_batches", "2",
        "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=tmp_path, env=env)
    lines = [line.split() for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    assert lines[-1][1:] == ["lightning_pdasgd.pl.cli_aliases", "3", "4", "False"]


TWO_RANK_SCRIPT = """
import os
import sys
import pytorch_lightning as pl
import lightning_pdasgd
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class Net(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))

    def training_step(self, batch, idx):
        return nn.functional.cross_entropy(self.layer(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


pl.seed_everything(0)
x = torch.randn(256, 8)
trainer = pl.Trainer(strategy="pdasgd", accelerator="cpu", devices=2, max_epochs=2, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
trainer.fit(Net(), DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=16))
row = ["RESULT", trainer.global_rank, type(trainer.strategy).__module__, trainer.global_step,
       trainer.strategy.stats.total_updates, "lightning" in sys.modules]
sys.stdout.flush()
# the two ranks share this pipe: one write of the whole line (atomic below PIPE_BUF), or the ranks' prints interleave
os.write(1, (" ".join(map(str, row)) + "\\n").encode())
"""


def test_pytorch_lightning_two_ranks_share_epochs(tmp_path: Path) -> None:
    """Two processes under pytorch_lightning only: its launcher, sampler and collectives with our strategy."""
    script = tmp_path / "two_ranks.py"
    script.write_text(TWO_RANK_SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=280, cwd=tmp_path,
                          env=env)  # fmt: skip
    rows = sorted(line.split()[1:] for line in done.stdout.splitlines() if line.startswith("RESULT "))
    # both streams in the message: CI runs twice ended with code 0 and no RESULT line; the second message showed
    # the two ranks' prints interleaved ("RESULTRESULT 0 ..."), so each rank now writes its line in one call
    assert done.returncode == 0 and len(rows) == 2, (done.returncode, done.stdout[-2000:], done.stderr[-3000:])
    assert [row[0] for row in rows] == ["0", "1"]
    assert all(row[1] == "lightning_pdasgd.pl.strategy" and row[4] == "False" for row in rows), rows
    # one step count over all ranks (docs/multi-device.md): both see every batch of the 2 epochs of 16 batches,
    # and both trained some of them
    assert all(int(row[2]) == 2 * 256 // 16 for row in rows), f"global_step counts all ranks' batches: {rows}"
    assert all(int(row[3]) > 0 for row in rows)


def test_mixed_lightning_class_under_pytorch_lightning_trainer_uses_its_checks() -> None:
    """Both packages imported first: ``lightning_pdasgd.PDASGDStrategy`` (the ``lightning`` class) meets a
    pytorch_lightning Trainer's Timer, SIGTERMException, launcher and refusals as that package's."""
    code = """
import pytorch_lightning as pl, lightning, lightning_pdasgd, json, torch
from lightning_fabric.plugins.environments import LightningEnvironment
from pytorch_lightning.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from pytorch_lightning.utilities.exceptions import MisconfigurationException, SIGTERMException
from lightning_pdasgd.integration import preemption, setup_checks
out = {"class": lightning_pdasgd.PDASGDStrategy.__module__}
try:
    setup_checks.check_multi_device_settings(pl.Trainer(max_time="00:00:01:00", logger=False))
except MisconfigurationException as error:
    out["timer"] = "max_time" in str(error)
out["sigterm"] = preemption.is_preemption(SIGTERMException())
strategy = lightning_pdasgd.PDASGDStrategy(parallel_devices=[torch.device("cpu")] * 2,
                                           cluster_environment=LightningEnvironment())
strategy._configure_launcher()
out["launcher"] = isinstance(strategy.launcher, _SubprocessScriptLauncher)
print("RESULT " + json.dumps(out))
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT ") :])
    assert result == {"class": "lightning_pdasgd.strategy", "timer": True, "sigterm": True, "launcher": True}


# ------------------------------------------------------------------------------------------- our own checks, in-process
# Both packages are imported in pytest's interpreter; ``lightning_pdasgd.pl`` is the pytorch_lightning flavour.
def _pl_module(override_gradient_hook: bool = False) -> Any:
    import pytorch_lightning as pl
    import torch
    from torch import nn

    class Net(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(4, 2)

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            return self.layer(batch[0]).pow(2).mean()

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    if override_gradient_hook:

        class Hooked(Net):
            def on_after_backward(self) -> None:
                pass

        return Hooked()
    return Net()


def _pl_data() -> Any:
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    return DataLoader(TensorDataset(torch.randn(32, 4)), batch_size=4)


def test_only_lightning_facing_modules_load_twice() -> None:
    import lightning_pdasgd.pl  # noqa: F401
    from lightning_pdasgd import _flavor

    prefix = "lightning_pdasgd.pl."
    loaded = {name.removeprefix(prefix) for name in sys.modules if name.startswith(prefix)}
    assert loaded <= set(_flavor.FLAVOURED), f"Lightning-free modules must load once: {loaded - set(_flavor.FLAVOURED)}"


def test_pytorch_lightning_refusal_is_its_misconfiguration_exception() -> None:
    import pytorch_lightning as pl
    import torch
    from pytorch_lightning.plugins.precision import MixedPrecision
    from pytorch_lightning.utilities.exceptions import MisconfigurationException

    scaled = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    trainer = pl.Trainer(strategy="pdasgd", plugins=[scaled], max_steps=2, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    with pytest.raises(MisconfigurationException, match="GradScaler"):
        trainer.fit(_pl_module(), _pl_data())
    assert type(trainer.strategy).__module__ == "lightning_pdasgd.pl.strategy"


def test_pytorch_lightning_timer_refused_with_several_devices() -> None:
    import pytorch_lightning as pl
    from lightning_pdasgd.pl.integration.setup_checks import check_multi_device_settings
    from pytorch_lightning.utilities.exceptions import MisconfigurationException

    with pytest.raises(MisconfigurationException, match="max_time"):
        check_multi_device_settings(pl.Trainer(max_time="00:00:01:00", logger=False))


def test_pytorch_lightning_gradient_hooks_named_are_real_overrides_only() -> None:
    import warnings

    from lightning_pdasgd.pl.integration.setup_checks import synchronous_reason

    hooked = _pl_module(override_gradient_hook=True)
    assert "Hooked.on_after_backward" in synchronous_reason(hooked, [], "synchronous", [])
    with pytest.warns(UserWarning, match=r"Hooked\.on_after_backward"):
        assert synchronous_reason(_pl_module(override_gradient_hook=True), [], "skip", []) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert synchronous_reason(_pl_module(), [], "synchronous", []) is None


def test_pytorch_lightning_sigterm_is_preemption() -> None:
    from lightning_pdasgd.pl.integration.preemption import is_preemption
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    assert is_preemption(SIGTERMException()) and is_preemption(KeyboardInterrupt())
    assert not is_preemption(RuntimeError())


def test_pytorch_lightning_launcher_is_recognised_by_its_call_module() -> None:
    import torch
    from lightning_fabric.plugins.environments import LightningEnvironment
    from pytorch_lightning.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

    from lightning_pdasgd.pl import PDASGDStrategy

    strategy = PDASGDStrategy(parallel_devices=[torch.device("cpu")] * 2, cluster_environment=LightningEnvironment())
    strategy._configure_launcher()
    assert isinstance(strategy.launcher, _SubprocessScriptLauncher)


def test_pytorch_lightning_progress_bar_gets_the_estimate() -> None:
    import pytorch_lightning as pl
    from lightning_pdasgd.pl.callbacks import show_estimated_epoch_length

    totals: list[Any] = []

    class Estimate(pl.Callback):
        def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, idx: int) -> None:
            if idx == 0:
                trainer.train_dataloader.batch_sampler.estimated_batches = 3
                show_estimated_epoch_length(trainer)
                totals.append(trainer.progress_bar_callback.train_progress_bar.total)

    trainer = pl.Trainer(max_epochs=1, limit_train_batches=5, logger=False, enable_checkpointing=False,
                         enable_model_summary=False, callbacks=[Estimate()])  # fmt: skip
    trainer.fit(_pl_module(), _pl_data())
    assert totals == [3]
