"""Small shared helpers for the tests."""

from __future__ import annotations

import threading


def engine_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name.startswith("pdasgd-")]


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
