"""lightning-pdasgd: Partial Decoupled Asynchronous SGD as a PyTorch Lightning strategy.

``import lightning_pdasgd`` registers ``Trainer(strategy="pdasgd")`` with ``lightning`` and with the standalone
``pytorch_lightning``, whichever the program imports (before or after this package), and imports neither itself.

``PDASGDStrategy``, ``EngineDrain`` and ``Straggler`` are resolved on first access: the ``pytorch_lightning`` classes
(``lightning_pdasgd.pl``) when only ``pytorch_lightning`` is imported, else the ``lightning`` ones (importing
``lightning`` if nothing is imported yet; ``pytorch_lightning`` if ``lightning`` is not installed). With both
imported, either strategy class is accepted by either Trainer. See ``_flavor.py``.
"""

from __future__ import annotations

from typing import Any

from lightning_pdasgd import _flavor
from lightning_pdasgd.errors import (
    ConsistentPointMismatchError,
    EngineTimeoutError,
    NonFiniteError,
    RankFailedError,
    StepMismatchError,
)

__all__ = [
    "ConsistentPointMismatchError",
    "EngineDrain",
    "EngineTimeoutError",
    "NonFiniteError",
    "PDASGDStrategy",
    "RankFailedError",
    "StepMismatchError",
    "Straggler",
]
__version__ = "0.1.0"

_LIGHTNING_CLASSES = {"PDASGDStrategy": "strategy", "EngineDrain": "callbacks", "Straggler": "straggler"}


def __getattr__(name: str) -> Any:
    """The Lightning classes, of the flavour the program uses (looked up once, then kept)."""
    module = _LIGHTNING_CLASSES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    flavor = _flavor.preferred()
    _flavor.activate(flavor)
    value = getattr(flavor.ours(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


_flavor.install()
