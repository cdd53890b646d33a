from __future__ import annotations

import warnings
from collections.abc import Iterator

import pytest
import torch

import lightning_pdasgd  # noqa: F401 - registers strategy="pdasgd"
from lightning_pdasgd.engine.thread_control import ENGINE_AT_ONE_IN_FLIGHT
from tests.helpers import engine_threads


@pytest.fixture(autouse=True)
def _no_engine_thread_survives() -> Iterator[None]:
    """Every test: no engine thread outlives the fit that started it."""
    threads = torch.get_num_threads()
    yield
    assert engine_threads() == [], f"engine threads still alive: {engine_threads()}"
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _quiet_lightning() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")
        warnings.filterwarnings("ignore", message=".*The number of training batches.*")
        yield


@pytest.fixture(autouse=True)
def _engine_at_one_loss_in_flight(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test: ``max_in_flight=1`` runs through the engine, whose own exactness the tests prove at one loss in
    flight (users get Lightning's synchronous step there; ``tests/test_exact_mode.py`` unsets this to test that).
    Distributed workers inherit it through the environment."""
    monkeypatch.setenv(ENGINE_AT_ONE_IN_FLIGHT, "1")


@pytest.fixture
def users_exact_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    """What users get: ``max_in_flight=1`` runs Lightning's own step (the suite otherwise runs it through the engine,
    see ``_engine_at_one_loss_in_flight`` above)."""
    monkeypatch.delenv(ENGINE_AT_ONE_IN_FLIGHT, raising=False)
