"""With one loss in flight, PD-ASGD must train exactly like plain Lightning (same seed, same batches)."""

from __future__ import annotations

from typing import Any

import lightning as L
import pytest
import torch

from lightning_pdasgd import PDASGDStrategy
from tests.helpers import DIGITS_OPTIMIZERS, fit_digits, trainer_kwargs
from tests.models import DigitsClassifier, DigitsData


@pytest.mark.parametrize("optimizer", sorted(DIGITS_OPTIMIZERS))
def test_one_in_flight_matches_plain_lightning(optimizer: str) -> None:
    plain, plain_trainer = fit_digits("auto", optimizer)
    pdasgd, pdasgd_trainer = fit_digits(PDASGDStrategy(max_in_flight=1), optimizer)

    assert pdasgd_trainer.global_step == plain_trainer.global_step == 40
    plain_state, pdasgd_state = plain.state_dict(), pdasgd.state_dict()
    assert plain_state.keys() == pdasgd_state.keys()
    for key in plain_state:  # parameters and BatchNorm buffers
        difference = (plain_state[key].double() - pdasgd_state[key].double()).abs().max().item()
        assert difference <= 1e-6, f"{key} differs by {difference}"

    plain_opt, pdasgd_opt = plain_trainer.optimizers[0], pdasgd_trainer.optimizers[0]
    assert [g["lr"] for g in plain_opt.param_groups] == [g["lr"] for g in pdasgd_opt.param_groups]
    plain_sd, pdasgd_sd = plain_opt.state_dict(), pdasgd_opt.state_dict()
    assert plain_sd["state"].keys() == pdasgd_sd["state"].keys()
    for index, state in plain_sd["state"].items():
        for name, value in state.items():
            other = pdasgd_sd["state"][index][name]
            if isinstance(value, torch.Tensor):
                assert torch.allclose(value.double(), other.double(), atol=1e-6), (index, name)
            else:
                assert value == other
    plain_sched = plain_trainer.lr_scheduler_configs[0].scheduler
    pdasgd_sched = pdasgd_trainer.lr_scheduler_configs[0].scheduler
    assert plain_sched.last_epoch == pdasgd_sched.last_epoch == 40


def test_logged_learning_rate_and_metrics_match_plain(tmp_path: Any) -> None:
    """LearningRateMonitor and `self.log` from training_step record the same rows as a plain run."""
    import csv

    fit_digits("auto", "sgd_plain", steps=20, tmp_path=tmp_path / "plain")
    fit_digits(PDASGDStrategy(max_in_flight=1, metrics="full"), "sgd_plain", steps=20, tmp_path=tmp_path / "pdasgd")

    def rows(root: Any) -> list[dict[str, str]]:
        (path,) = root.rglob("metrics.csv")
        with open(path) as handle:
            return list(csv.DictReader(handle))

    plain_rows, pdasgd_rows = rows(tmp_path / "plain"), rows(tmp_path / "pdasgd")
    assert len(plain_rows) == len(pdasgd_rows)
    for plain_row, pdasgd_row in zip(plain_rows, pdasgd_rows):
        assert pdasgd_row["step"] == plain_row["step"]
        for key in ("lr-SGD", "train_loss_step"):
            assert bool(plain_row.get(key)) == bool(pdasgd_row.get(key)), key
            if plain_row.get(key):
                assert float(pdasgd_row[key]) == pytest.approx(float(plain_row[key]), rel=1e-5, abs=1e-7), key
    logged = {key for row in pdasgd_rows for key, value in row.items() if value}
    assert {"pdasgd/staleness_mean", "pdasgd/staleness_max", "pdasgd/queue_depth"} <= logged
    assert {"pdasgd/forward_ms", "pdasgd/backward_ms", "pdasgd/updates_per_sec"} <= logged
    staleness = [float(row["pdasgd/staleness_max"]) for row in pdasgd_rows if row.get("pdasgd/staleness_max")]
    assert staleness and max(staleness) == 0.0, "one loss in flight means no update is ever stale"


class PlateauClassifier(DigitsClassifier):
    """ReduceLROnPlateau on the validation accuracy, with an epoch interval and a frequency."""

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=0.5, momentum=0.9)
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=0.5, patience=0)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": plateau, "monitor": "val_acc", "interval": "epoch", "frequency": 1}}


def test_reduce_on_plateau_acts_on_the_real_updates() -> None:
    results = []
    for strategy in ("auto", PDASGDStrategy(max_in_flight=1)):
        L.seed_everything(5)
        model = PlateauClassifier()
        trainer = L.Trainer(strategy=strategy, max_epochs=5, limit_train_batches=10, **trainer_kwargs())
        trainer.fit(model, DigitsData(batch_size=32))
        results.append((trainer.optimizers[0].param_groups[0]["lr"], model.val_accuracy,
                        torch.cat([p.detach().flatten() for p in model.parameters()])))
    (plain_lr, plain_acc, plain_params), (pd_lr, pd_acc, pd_params) = results
    assert plain_lr == pd_lr < 0.5, "the plateau scheduler reduced the learning rate in both runs"
    assert plain_acc == pytest.approx(pd_acc, abs=1e-6)
    assert (plain_params - pd_params).abs().max() <= 1e-5
