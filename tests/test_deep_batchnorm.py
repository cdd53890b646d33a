"""Default settings on a deep BatchNorm network: torchvision's ResNet-18 at plain Lightning's hyperparameters.

Why this test exists: one step of delay on every layer takes this model to chance accuracy (a single-threaded
simulation: 0.10 against plain's 0.96), and a scheduling change once did exactly that to the engine without any
MLP test noticing. Lazy layer-wise reads keep the output side fresh, which is what makes it train. Measured on
2 CPU cores after 2 epochs (benchmarks/results/convergence-paired, 5 seeds): plain 0.842-0.958, the default
0.933-0.972, and after 3 epochs means of 0.963 and 0.972; every bucket read at the step's start (the old engine,
benchmarks/results/convergence-deep) 0.24-0.62.
"""

from __future__ import annotations

import lightning as L
import pytest

from lightning_pdasgd import PDASGDStrategy
from tests.helpers import trainer_kwargs
from tests.models import DigitsData, DigitsResNet


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.usefixtures("users_exact_mode")  # default settings as users get them (the warm-up: Lightning's step)
def test_resnet18_with_batchnorm_trains_at_plain_hyperparameters_with_default_settings() -> None:
    L.seed_everything(0)
    model = DigitsResNet()
    # 3 epochs: after 2 this learning rate without a schedule still swings by 10 points from one epoch to the next
    # (a CI run read 0.942 then 0.833), for plain Lightning too
    trainer = L.Trainer(strategy=PDASGDStrategy(), max_epochs=3, **trainer_kwargs())
    trainer.fit(model, DigitsData(batch_size=64))
    assert trainer.strategy.stats.mean_staleness > 0.3, "the run must be asynchronous to mean anything"
    assert model.val_accuracy[-1] >= 0.85, model.val_accuracy
