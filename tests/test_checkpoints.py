"""Checkpoints are Lightning's standard ones: drained, same keys as a plain run, interchangeable both ways."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_pdasgd import PDASGDStrategy
from tests.helpers import trainer_kwargs
from tests.models import DigitsClassifier, DigitsData


def _adam(params: Any) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=5e-3)


def _model() -> DigitsClassifier:
    return DigitsClassifier(optimizer=_adam, scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, 20, 0.5))


def _train(strategy: Any, epochs: int, ckpt_path: Path | None = None, save_to: Path | None = None) -> Any:
    L.seed_everything(11)
    model = _model()
    trainer = L.Trainer(strategy=strategy, max_epochs=epochs, limit_train_batches=15, **trainer_kwargs())
    trainer.fit(model, DigitsData(batch_size=32), ckpt_path=ckpt_path)
    if save_to is not None:
        trainer.save_checkpoint(save_to)
    return model, trainer


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([value.double().flatten() for value in model.state_dict().values()])


def _structure(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _structure(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_structure(item) for item in value]
    return type(value).__name__


def test_checkpoint_has_the_plain_format(tmp_path: Path) -> None:
    _train("auto", 1, save_to=tmp_path / "plain.ckpt")
    _train(PDASGDStrategy(), 1, save_to=tmp_path / "pdasgd.ckpt")
    plain = torch.load(tmp_path / "plain.ckpt", weights_only=False)
    pdasgd = torch.load(tmp_path / "pdasgd.ckpt", weights_only=False)
    plain.pop("pytorch-lightning_version"), pdasgd.pop("pytorch-lightning_version")
    assert _structure(plain) == _structure(pdasgd)


@pytest.mark.parametrize(("first", "second"), [("pdasgd", "pdasgd"), ("pdasgd", "auto"), ("auto", "pdasgd")])
def test_resume_across_strategies_matches_plain_resume(tmp_path: Path, first: str, second: str) -> None:
    """Resume from a checkpoint written by `first` with `second`; it must continue exactly as a plain resume."""
    make = {"pdasgd": lambda: PDASGDStrategy(max_in_flight=1), "auto": lambda: "auto"}
    ckpt = tmp_path / "first.ckpt"
    _train(make[first](), 2, save_to=ckpt)
    reference, reference_trainer = _train("auto", 3, ckpt_path=ckpt)
    resumed, resumed_trainer = _train(make[second](), 3, ckpt_path=ckpt)
    assert resumed_trainer.global_step == reference_trainer.global_step == 45
    assert (_flat(reference) - _flat(resumed)).abs().max().item() <= 1e-6
    reference_state = reference_trainer.optimizers[0].state_dict()["state"]
    resumed_state = resumed_trainer.optimizers[0].state_dict()["state"]
    assert all(reference_state[i]["step"] == resumed_state[i]["step"] == 45 for i in reference_state)


def test_concurrent_run_resumes_and_continues(tmp_path: Path) -> None:
    ckpt = tmp_path / "concurrent.ckpt"
    first, _ = _train(PDASGDStrategy(backward_threads=3), 2, save_to=ckpt)
    saved = torch.load(ckpt, weights_only=False)
    for key, value in first.state_dict().items():
        assert torch.equal(saved["state_dict"][key], value), key
    _, trainer = _train(PDASGDStrategy(backward_threads=3), 4, ckpt_path=ckpt)
    assert trainer.global_step == 60


def test_checkpoints_are_drained(tmp_path: Path) -> None:
    """Every checkpoint saved mid-epoch holds exactly global_step updates of every parameter."""
    L.seed_everything(0)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=7, save_top_k=-1)
    trainer = L.Trainer(
        strategy=PDASGDStrategy(backward_threads=3, max_in_flight=6),
        max_epochs=2,
        limit_val_batches=0,
        callbacks=[checkpoint],
        **trainer_kwargs(enable_checkpointing=True),
    )
    trainer.fit(_model(), DigitsData(batch_size=16))
    paths = sorted(tmp_path.glob("*.ckpt"))
    assert len(paths) >= 10
    for path in paths:
        saved = torch.load(path, weights_only=False)
        steps = {int(state["step"]) for state in saved["optimizer_states"][0]["state"].values()}
        assert steps == {saved["global_step"]}, (path.name, steps)
