"""The thread-ratio autotuner: valid choices, no update lost while it switches, slow backwards get threads."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from lightning_pdasgd import PDASGDStrategy
from lightning_pdasgd.engine.autotune import Candidate, ThreadAutotuner, default_candidates, plan_trials
from tests.helpers import trainer_kwargs
from tests.models import LR, DelayedBackward, DigitsClassifier, DigitsData, LinearLoss, integer_batches


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


@pytest.mark.parametrize("steps_per_trial", [2, 6])
def test_a_trial_is_charged_the_backwards_still_in_flight_when_its_clock_stops(steps_per_trial: int) -> None:
    """An asynchronous candidate's forwards return before their backwards finish: a clock stopped with backwards
    still queued timed forwards only (with 2 steps per trial, the one timed step was a lone forward, and a short run
    chose 1:2 at 2x its real speed). Here a 1:2 step's forward takes 3 ms and its backward 9 ms, left in flight
    until a drain; plain Lightning's step takes 10 ms. The trials must see 12 ms against 10."""
    now, backlog = [0.0], [0.0]

    def drain() -> None:
        now[0], backlog[0] = now[0] + backlog[0], 0.0

    tuner = ThreadAutotuner([Candidate(0, None), Candidate(2, None)], steps_per_trial=steps_per_trial,
                            clock=lambda: now[0], drain=drain)
    current = tuner.before_step((0, 0))
    while not tuner.done:
        if current.synchronous:
            now[0] += 0.010
        else:
            now[0], backlog[0] = now[0] + 0.003, backlog[0] + 0.009
        current = tuner.before_step((0, 0)) or current
    assert tuner.chosen == Candidate(0, None), tuner.report()
    rates = {trial.candidate.backward_threads: trial.steps_per_second for trial in tuner.trials}
    assert rates[0] == pytest.approx(100.0) and rates[2] == pytest.approx(1 / 0.012), tuner.report()


def test_autotune_picks_a_valid_configuration_and_loses_no_update() -> None:
    """Switching configurations between steps drains first: the exact sum of all gradients still lands."""
    width, steps = 64, 150
    loader = integer_batches(steps, width)
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
    trainer = L.Trainer(strategy=strategy, max_steps=400, limit_val_batches=0, **trainer_kwargs())
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


def test_trials_fit_in_a_small_share_of_short_runs() -> None:
    candidates = default_candidates(torch.device("cpu"), allow_synchronous=True)
    assert plan_trials(candidates, 6, float("inf")) == (candidates, 6)
    pool, steps = plan_trials(candidates, 6, 200)
    assert len(pool) * steps <= 20 and steps >= 2
    pool, steps = plan_trials(candidates, 6, 100)  # too few steps for every candidate: the core budget only
    assert all(c.intra_op_threads is None for c in pool) and len(pool) * steps <= 10
    assert plan_trials(candidates, 6, 20) is None  # not worth tuning


def test_short_auto_run_keeps_trials_within_its_share() -> None:
    strategy = PDASGDStrategy(backward_threads="auto")
    trainer = L.Trainer(strategy=strategy, max_steps=47, limit_val_batches=0, **trainer_kwargs())
    trainer.fit(DigitsClassifier(), DigitsData(batch_size=32))
    assert strategy.autotune_report is None  # 47 steps: no trial at all instead of 42 steps of trials
    strategy = PDASGDStrategy(backward_threads="auto")
    trainer = L.Trainer(strategy=strategy, max_steps=200, limit_val_batches=0, **trainer_kwargs())
    trainer.fit(DigitsClassifier(), DigitsData(batch_size=32))
    report = strategy.autotune_report
    assert report is not None and len(report.splitlines()) - 1 == 7  # every candidate, 2 steps each: 14 <= 20


def _tune(
    candidates: list[Candidate], seconds: dict[int, float], steps_per_trial: int
) -> tuple[ThreadAutotuner, dict[int, int]]:
    """Run a tuner to its choice on a clock that each step advances by its candidate's step time (by backward
    threads); returns it and the steps each thread count trained."""
    now = [0.0]
    tuner = ThreadAutotuner(candidates, steps_per_trial=steps_per_trial, clock=lambda: now[0])
    current, steps = tuner.before_step((0, 0)), {candidate.backward_threads: 0 for candidate in candidates}
    while not tuner.done:
        steps[current.backward_threads] += 1
        now[0] += seconds[current.backward_threads]
        current = tuner.before_step((0, 0)) or current
    return tuner, steps


@pytest.mark.parametrize(("two_threads_seconds", "three_timed"), [(0.012, False), (0.008, True)])
def test_more_backward_threads_are_timed_only_while_they_pay(two_threads_seconds: float, three_timed: bool) -> None:
    """The climb over backward thread counts ends at the first count no faster than the one below it (here 1:2
    against 1:1): higher counts would only add contention, and their trials would cost the run for nothing."""
    candidates = [Candidate(1, None), Candidate(2, None), Candidate(3, None)]
    tuner, steps = _tune(candidates, {1: 0.01, 2: two_threads_seconds, 3: 0.005}, steps_per_trial=4)
    assert (steps[3] > 0) is three_timed
    assert tuner.chosen == (Candidate(3, None) if three_timed else Candidate(1, None))
    assert ("1:3" in tuner.report()) and ("not timed" in tuner.report()) is not three_timed


@pytest.mark.parametrize(("slowdown", "dropped"), [(1 / 0.7, True), (1 / 0.9, False)])
def test_only_a_candidate_well_below_the_best_rate_is_dropped(slowdown: float, dropped: bool) -> None:
    """Below three quarters of the best finished trial's rate after two timed steps, a trial ends; a candidate near
    the best (within measurement noise of it) runs all its steps."""
    tuner, steps = _tune([Candidate(1, None), Candidate(2, None)], {1: 0.01, 2: 0.01 * slowdown}, steps_per_trial=6)
    assert steps[2] == (3 if dropped else 6)
    assert tuner.trials[1].dropped is dropped and tuner.chosen == Candidate(1, None)


def test_a_clearly_slower_candidate_is_dropped_early() -> None:
    # the second candidate is 10x slower
    tuner, steps = _tune([Candidate(1, None), Candidate(2, None)], {1: 0.001, 2: 0.01}, steps_per_trial=10)
    assert steps[1] == 10 and steps[2] == 3  # one untimed and two timed steps were enough to drop it
    assert tuner.chosen == Candidate(1, None) and "dropped early" in tuner.report()
