"""The thread-ratio autotuner: valid choices, no update lost while it switches, slow backwards get threads."""

from __future__ import annotations

from typing import Any

import lightning as L
import pytest
import torch

from lightning_pdasgd import PDASGDStrategy
from lightning_pdasgd.autotune import Candidate, ThreadAutotuner, default_candidates
from tests.helpers import trainer_kwargs
from tests.models import DelayedBackward, DigitsClassifier, DigitsData
from tests.test_concurrency import LR, LinearLoss, _integer_batches


def test_candidates_cover_plain_and_thread_counts() -> None:
    cpu = default_candidates(torch.device("cpu"), allow_synchronous=True)
    assert cpu[0] == Candidate(0, None) and cpu[0].synchronous
    assert {c.backward_threads for c in cpu[1:]} == {1, 2, 3}
    assert Candidate(0, None) not in default_candidates(torch.device("cpu"), allow_synchronous=False)
    with pytest.raises(ValueError, match="autotune_steps"):
        ThreadAutotuner(cpu, steps_per_trial=1)


def test_tuner_prefers_the_fastest_within_the_staleness_bound() -> None:
    now = [0.0]  # an injected clock: each step advances it by exactly the candidate's step time
    tuner = ThreadAutotuner([Candidate(0, None), Candidate(2, None), Candidate(3, None)], steps_per_trial=2,
                            max_staleness=1.0, clock=lambda: now[0])
    rates = {0: 0.01, 2: 0.004, 3: 0.002}  # seconds per step; 3 threads is fastest but too stale
    staleness = {0: 0, 2: 1, 3: 5}
    total, count = 0, 0
    current = tuner.before_step((total, count))
    while not tuner.done:
        now[0] += rates[current.backward_threads]
        total, count = total + staleness[current.backward_threads] * 10, count + 10
        current = tuner.before_step((total, count)) or current
    assert tuner.chosen == Candidate(2, None), tuner.report()
    assert "chose 1:2" in tuner.report()


def test_autotune_picks_a_valid_configuration_and_loses_no_update() -> None:
    """Switching configurations between steps drains first: the exact sum of all gradients still lands."""
    width, steps = 64, 150
    loader = _integer_batches(steps, width)
    total = torch.cat([batch for (batch,) in loader]).sum(dim=0)
    threads_before = torch.get_num_threads()
    strategy = PDASGDStrategy(backward_threads="auto", autotune_steps=4)
    model = LinearLoss(width)
    trainer = L.Trainer(strategy=strategy, max_epochs=1, **trainer_kwargs())
    trainer.fit(model, loader)
    assert strategy.autotune_report is not None and "chose" in strategy.autotune_report
    candidates = default_candidates(torch.device("cpu"), allow_synchronous=True)
    chosen_line = strategy.autotune_report.splitlines()[0]
    assert any(f"chose {candidate}" in chosen_line for candidate in candidates)
    assert torch.equal(model.first.detach(), -LR * total)
    assert torch.equal(model.shared.weight.detach().squeeze(0), -LR * 2 * total)
    assert torch.get_num_threads() == threads_before  # the trials' intra-op settings are undone when fit ends


class SlowBackwardModel(DigitsClassifier):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return DelayedBackward.apply(self.net(x), 0.02)  # a long backward leaving the cores idle


def test_slow_backward_gets_more_backward_threads() -> None:
    strategy = PDASGDStrategy(backward_threads="auto", autotune_steps=5, autotune_max_staleness=10)
    trainer = L.Trainer(strategy=strategy, max_steps=60, limit_val_batches=0, **trainer_kwargs())
    trainer.fit(SlowBackwardModel(), DigitsData(batch_size=32))
    report = strategy.autotune_report
    assert report is not None
    chosen = report.splitlines()[0]
    assert "chose 1:2" in chosen or "chose 1:3" in chosen, report


def test_autotune_trains_digits() -> None:
    L.seed_everything(0)
    model = DigitsClassifier(optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9))
    strategy = PDASGDStrategy(backward_threads="auto")
    trainer = L.Trainer(strategy=strategy, max_epochs=5, **trainer_kwargs())
    trainer.fit(model, DigitsData(batch_size=32))
    assert strategy.autotune_report is not None
    assert max(model.val_accuracy) >= 0.95
