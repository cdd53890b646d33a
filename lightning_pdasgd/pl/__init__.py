"""lightning-pdasgd for the standalone ``pytorch_lightning`` package: ``lightning_pdasgd.pl.PDASGDStrategy``.

The same source as ``lightning_pdasgd``: this package's ``__path__`` is the parent folder, so
``lightning_pdasgd.pl.strategy`` is ``strategy.py`` loaded a second time, with its Lightning names taken from
``pytorch_lightning`` / ``lightning_fabric`` (``_lightning.py``, ``_flavor.py``). Only the Lightning-facing modules
(``_flavor.FLAVOURED``) load here; the rest are shared with ``lightning_pdasgd``.

``import lightning_pdasgd`` is enough for ``pytorch_lightning.Trainer(strategy="pdasgd")`` and, when only
``pytorch_lightning`` is imported, ``lightning_pdasgd.PDASGDStrategy`` is this one. Import it from here to get the
``pytorch_lightning`` classes whatever else is imported.
"""

from __future__ import annotations

import os

from lightning_pdasgd import _flavor

__path__ = [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]

from .callbacks import EngineDrain  # noqa: E402 - the names are found through __path__, set just above
from .straggler import Straggler  # noqa: E402
from .strategy import PDASGDStrategy  # noqa: E402

_flavor.activate(_flavor.PYTORCH_LIGHTNING)

__all__ = ["EngineDrain", "PDASGDStrategy", "Straggler"]
