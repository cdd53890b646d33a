"""Shared pieces of the compatibility tests: a tiny digits task, seeded fits, comparisons and the result recorder.

Why a separate module: the compatibility matrix and the parameter-change tests run the same plain-vs-pdasgd
comparison on the same task, and the matrix records each row's outcome for ``tools/compat_table.py``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from tests.helpers import trainer_kwargs
from tests.models import DigitsData, digits_tensors

# the environment variable naming the JSON file the matrix writes its rows to (default: pytest's tmp dir)
RESULTS_ENV = "PDASGD_COMPAT_JSON"


class MatrixNet(LightningModule):
    """A small MLP on the digits with a ``backbone`` and a ``head`` (what fine-tuning recipes expect).

    ``lr`` is an attribute so the learning-rate finders can set it; the optimizer only takes parameters that
    require grad (the documented fine-tuning pattern).
    """

    def __init__(
        self,
        lr: float = 0.1,
        hidden: int = 32,
        batch_norm: bool = False,
        scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
        momentum: float = 0.9,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(64, hidden)]
        if batch_norm:
            layers.append(nn.BatchNorm1d(hidden))
        layers.append(nn.ReLU())
        self.backbone = nn.Sequential(*layers)
        self.head = nn.Linear(hidden, 10)
        self.lr = lr
        self.momentum = momentum
        self.scheduler_factory = scheduler

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_loss", nn.functional.cross_entropy(logits, y), prog_bar=False)
        self.log("val_acc", (logits.argmax(dim=1) == y).float().mean(), prog_bar=True)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        return self(batch[0])

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=self.lr, momentum=self.momentum)
        if self.scheduler_factory is None:
            return optimizer
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer), "interval": "step"},
        }


def fit(
    strategy: Any,
    model_factory: Callable[[], LightningModule] = MatrixNet,
    callbacks: Iterable[Any] = (),
    epochs: int = 3,
    batches: float = 10,
    batch_size: int = 32,
    seed: int = 7,
    data: L.LightningDataModule | None = None,
    **overrides: Any,
) -> tuple[LightningModule, L.Trainer]:
    """One seeded fit on the digits (``batches`` training batches per epoch, validation at every epoch end)."""
    L.seed_everything(seed, verbose=False)
    model = model_factory()
    trainer = L.Trainer(
        strategy=strategy,
        max_epochs=epochs,
        limit_train_batches=batches,
        callbacks=list(callbacks),
        **trainer_kwargs(**overrides),
    )
    trainer.fit(model, data if data is not None else DigitsData(batch_size=batch_size))
    return model, trainer


def accuracy(model: nn.Module) -> float:
    """Validation accuracy of ``model`` on the held-out digits, computed directly (no Lightning involved)."""
    _, val = digits_tensors()
    x, y = val.tensors
    was_training = model.training
    model.eval()
    with torch.no_grad():
        value = float((model(x).argmax(dim=1) == y).float().mean())
    model.train(was_training)
    return value


def max_difference(first: Mapping[str, torch.Tensor], second: Mapping[str, torch.Tensor]) -> float:
    """Largest absolute difference over the tensors of two state dicts (which must have the same keys)."""
    assert first.keys() == second.keys(), f"different keys: {sorted(first)} vs {sorted(second)}"
    return max(
        ((first[key].double() - second[key].double()).abs().max().item() for key in first if first[key].numel()),
        default=0.0,
    )


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


@dataclass
class Row:
    """One row of the compatibility matrix: what is compared, the checks made, and the verdict.

    ``result`` is ``same`` (every check within its tolerance), ``refused`` (setup raised a
    MisconfigurationException naming the feature) or ``DIFFERENT`` (anything else, with the numbers).
    """

    feature: str
    outcome: str
    strategy: str
    expected: str = "same"
    checks: list[dict[str, Any]] = field(default_factory=list)
    result: str | None = None
    note: str = ""

    def compare(self, what: str, plain: Any, pdasgd: Any, tolerance: float = 0.0) -> bool:
        """Record one check: numbers within ``tolerance`` (absolute), anything else equal."""
        if isinstance(plain, (int, float)) and isinstance(pdasgd, (int, float)) and not isinstance(plain, bool):
            ok = abs(float(plain) - float(pdasgd)) <= tolerance
        else:
            ok = plain == pdasgd
        self.checks.append(
            {"what": what, "plain": _jsonable(plain), "pdasgd": _jsonable(pdasgd), "tolerance": tolerance, "ok": ok}
        )
        return ok

    def require(self, what: str, value: Any, ok: bool) -> bool:
        """Record a check of the pdasgd run alone (e.g. 'the backbone changed')."""
        self.checks.append({"what": what, "plain": None, "pdasgd": _jsonable(value), "tolerance": None, "ok": bool(ok)})
        return bool(ok)

    def expect_refusal(self, run: Callable[[], Any], *names: str) -> None:
        """``run`` must raise a MisconfigurationException at setup whose message names all of ``names``."""
        self.expected = "refused"
        try:
            run()
        except MisconfigurationException as error:
            message = str(error)
            missing = [name for name in names if name not in message]
            self.require(f"error names {list(names)}", message[:300], not missing)
            self.result = "refused" if not missing else "DIFFERENT"
            return
        except Exception as error:  # noqa: BLE001 - any other failure is recorded, then the row fails
            self.require("refused with a MisconfigurationException", f"{type(error).__name__}: {error}"[:300], False)
            self.result = "DIFFERENT"
            return
        self.require("refused with a MisconfigurationException", "trained without an error", False)
        self.result = "DIFFERENT"

    def pdasgd_failed(self, error: BaseException) -> None:
        self.require("pdasgd fit completes", f"{type(error).__name__}: {error}"[:300], False)

    def finish(self) -> None:
        """Decide the verdict (unless a refusal check did) and fail the test when it is not the expected one."""
        if self.result is None:
            self.result = "same" if self.checks and all(check["ok"] for check in self.checks) else "DIFFERENT"
        failed = [check for check in self.checks if not check["ok"]]
        assert self.result == self.expected, (
            f"{self.feature}: expected {self.expected!r}, got {self.result!r}; failed checks: {failed}"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "feature": self.feature,
            "outcome": self.outcome,
            "strategy": self.strategy,
            "expected": self.expected,
            "result": self.result or "DIFFERENT",
            "checks": self.checks,
            "note": self.note,
        }


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, float):
        return round(value, 6)
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return repr(value)


def write_row(path: Path, row: Row) -> None:
    """Merge one row into the results file (rows keyed by feature, so reruns replace their own row)."""
    rows: dict[str, Any] = {}
    if path.exists():
        rows = json.loads(path.read_text())
    rows[row.feature] = row.as_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(rows, indent=2, sort_keys=True))
    os.replace(tmp, path)
