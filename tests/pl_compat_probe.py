"""Run in a fresh interpreter by ``tests/test_pytorch_lightning.py``: import exactly what the test says, in its
order (optionally making a package look uninstalled), fit a tiny digits model with the named Trainer packages
plainly and under PD-ASGD, and print one JSON line with what happened.

Why a subprocess: which of ``lightning`` / ``pytorch_lightning`` is imported (and in which order) is process-wide
state that a test inside pytest's interpreter cannot control.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.abc
import json
import sys
import traceback
import warnings
from typing import Any


class _Uninstalled(importlib.abc.MetaPathFinder):
    """Makes packages look uninstalled: their import raises ModuleNotFoundError, as it would without them."""

    def __init__(self, names: list[str]) -> None:
        self.names = names

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> None:
        if any(fullname == name or fullname.startswith(name + ".") for name in self.names):
            raise ModuleNotFoundError(f"No module named {fullname!r} (hidden by the test)", name=fullname)


def _digits() -> Any:
    import torch
    from sklearn.datasets import load_digits
    from torch.utils.data import DataLoader, TensorDataset

    x, y = load_digits(return_X_y=True)
    data = TensorDataset(torch.tensor(x[:512], dtype=torch.float32) / 16.0, torch.tensor(y[:512]))
    return DataLoader(data, batch_size=32)


def _fit(package: Any, strategy: Any) -> dict[str, Any]:
    """One seeded 16-step fit with ``package``'s Trainer and a LightningModule of the same package."""
    import torch
    from torch import nn

    class Net(package.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    package.seed_everything(3, verbose=False)
    model = Net()
    trainer = package.Trainer(
        strategy=strategy,
        max_epochs=2,
        limit_train_batches=8,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, _digits())
    stats = getattr(trainer.strategy, "stats", None)
    return {
        "weights": [p.detach().flatten().tolist() for p in model.parameters()],
        "global_step": trainer.global_step,
        "strategy_class": f"{type(trainer.strategy).__module__}.{type(trainer.strategy).__qualname__}",
        "is_package_parallel_strategy": isinstance(trainer.strategy, package.strategies.ParallelStrategy),
        "updates": getattr(stats, "total_updates", None),
        "pdasgd_warnings": [str(w.message)[:200] for w in caught if "PD-ASGD" in str(w.message)],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--uninstalled", default="", help="comma-separated packages to hide")
    parser.add_argument("--imports", required=True, help="comma-separated modules to import, in order")
    parser.add_argument("--trainers", default="", help="comma-separated packages whose Trainer to fit with")
    parser.add_argument("--strategy", choices=["name", "instance"], default="name")
    args = parser.parse_args()
    if args.uninstalled:
        sys.meta_path.insert(0, _Uninstalled(args.uninstalled.split(",")))
    result: dict[str, Any] = {"imports": {}, "fits": {}}
    for name in args.imports.split(","):
        try:
            importlib.import_module(name)
            result["imports"][name] = "ok"
        except Exception as error:  # noqa: BLE001 - reported to the test
            result["imports"][name] = f"{type(error).__name__}: {error}"
    for name in filter(None, args.trainers.split(",")):
        package = sys.modules.get(name)
        if package is None:
            result["fits"][name] = {"error": f"{name} was not imported"}
            continue
        try:
            plain = _fit(package, "auto")
            if args.strategy == "name":
                strategy: Any = "pdasgd"
            else:
                strategy = sys.modules["lightning_pdasgd"].PDASGDStrategy(max_in_flight=1)
            pdasgd = _fit(package, strategy)
            pdasgd["max_difference_to_plain"] = max(
                abs(a - b) for pa, pb in zip(plain["weights"], pdasgd["weights"]) for a, b in zip(pa, pb)
            )
            del pdasgd["weights"]
            result["fits"][name] = pdasgd
        except Exception as error:  # noqa: BLE001 - reported to the test
            result["fits"][name] = {
                "error": f"{type(error).__name__}: {error}"[:400],
                "trace": traceback.format_exc()[-800:],
            }
    result["loaded"] = {name: name in sys.modules for name in ("lightning", "pytorch_lightning", "lightning_fabric")}
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
