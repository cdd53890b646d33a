"""Small shared helpers for the tests: Trainer settings, engine-thread checks, and a seeded digits fit."""

from __future__ import annotations

import threading
from typing import Any, Callable

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger

from tests.models import DigitsClassifier, DigitsData

GATE_WAIT_S = 60.0

# The two-rank ``learn`` workload (tests/distributed_worker.py): epochs of 45 batches, all ranks together. Its
# validation accuracy climbs past 0.95 anywhere from the 5th to the 8th epoch with thread timing; 12 epochs put
# the tests' bar (0.95 at some epoch) well inside the run instead of at its last epoch.
LEARN_EPOCHS = 12


def engine_threads() -> list[threading.Thread]:
    """The PD-ASGD engine threads (named ``pdasgd-*``) alive right now."""
    return [thread for thread in threading.enumerate() if thread.name.startswith("pdasgd-")]


def engine_on_lightnings_path(trainer: Any) -> tuple[bool, bool]:
    """Whether the engine's drain callback is among the Trainer's callbacks, and whether the precision plugin's
    backward is routed to the engine."""
    callback = any(type(other).__name__ == "EngineDrain" for other in trainer.callbacks)
    return callback, "backward" in vars(trainer.strategy.precision_plugin)


def assert_identical_replicas(first: dict[str, Any], second: dict[str, Any]) -> None:
    """Two ranks' results hold bitwise-identical module state (parameters and buffers) and optimizer state."""
    assert first["state"].keys() == second["state"].keys()
    for key in first["state"]:
        assert torch.equal(first["state"][key], second["state"][key]), key
    for index, state in first["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, second["optimizer"]["state"][index][name]), (index, name)


def assert_same_training_state(plain: Any, plain_trainer: Any, other: Any, trainer: Any) -> None:
    """Two fits ended bit for bit alike: parameters, BatchNorm buffers and the optimizer's state."""
    for key, value in plain.state_dict().items():
        assert torch.equal(value, other.state_dict()[key]), key
    plain_state = plain_trainer.optimizers[0].state_dict()["state"]
    for index, state in trainer.optimizers[0].state_dict()["state"].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(plain_state[index][name])), (index, name)


def trainer_kwargs(**overrides: object) -> dict[str, object]:
    """A quiet CPU Trainer configuration for tests."""
    kwargs: dict[str, object] = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    kwargs.update(overrides)
    return kwargs


DIGITS_OPTIMIZERS: dict[str, Callable[[Any], torch.optim.Optimizer]] = {
    "sgd_momentum_nesterov_wd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "sgd_plain": lambda p: torch.optim.SGD(p, lr=0.1),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.05),
}  # the optimizers fit_digits compares plain Lightning and PD-ASGD under, by name


def step_scheduler(optimizer: torch.optim.Optimizer) -> Any:
    """StepLR halving the learning rate every 7 steps: the schedule of fit_digits."""
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=7, gamma=0.5)


def fit_digits(
    strategy: Any,
    optimizer: str,
    steps: int = 40,
    tmp_path: Any = None,
    callbacks: list[Any] | None = None,
    model_class: Callable[..., DigitsClassifier] = DigitsClassifier,
) -> tuple[DigitsClassifier, L.Trainer]:
    """Seeded DigitsClassifier (or ``model_class``) fit for ``steps`` steps (DIGITS_OPTIMIZERS[optimizer], StepLR,
    no validation); with ``tmp_path``, every step's metrics and lr are logged to a CSVLogger there."""
    L.seed_everything(1234)
    model = model_class(optimizer=DIGITS_OPTIMIZERS[optimizer], scheduler=step_scheduler)
    extra: dict[str, Any] = {"callbacks": list(callbacks or [])}
    if tmp_path is not None:
        extra = dict(logger=CSVLogger(tmp_path), callbacks=[LearningRateMonitor("step"), *extra["callbacks"]],
                     log_every_n_steps=1)
    trainer = L.Trainer(strategy=strategy, max_steps=steps, limit_val_batches=0, **trainer_kwargs(**extra))
    trainer.fit(model, DigitsData(batch_size=32))
    return model, trainer


class OneStaleGate(torch.autograd.Function):
    """Identity whose backward waits until the next forward ran (while the gate is ``active()``): each update it
    gates is applied after the next forward read the weights, so it is exactly one update stale on any machine."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, gate: "StaleGate", step: int) -> torch.Tensor:  # type: ignore[override]
        ctx.gate, ctx.step = gate, step
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:  # type: ignore[override]
        ctx.gate.wait_for_forward(ctx.step + 1)
        return grad, None, None


class StaleGate:
    """The forwards' progress, which ``OneStaleGate``'s backwards wait on (an event, with a timeout)."""

    def __init__(self, active: Callable[[], bool] = lambda: True) -> None:
        self.active = active
        self.forwards = -1
        self.changed = threading.Condition()

    def forward_ran(self, step: int) -> None:
        with self.changed:
            self.forwards = step
            self.changed.notify_all()

    def wait_for_forward(self, step: int) -> None:
        with self.changed:
            if not self.changed.wait_for(lambda: self.forwards >= step or not self.active(), timeout=GATE_WAIT_S):
                raise TimeoutError(f"forward {step} never ran")
