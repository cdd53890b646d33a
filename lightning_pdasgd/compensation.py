"""The 0.1 import path of the staleness compensations users pass as ``staleness_compensation=``.

They live in ``engine/compensation.py`` (Lightning-free); this module keeps ``from lightning_pdasgd.compensation
import DelayCompensation`` and configs that name ``lightning_pdasgd.compensation.<Class>`` working.
"""

from __future__ import annotations

from lightning_pdasgd.engine.compensation import (
    DEFAULT_STALENESS_COMPENSATION,
    STALENESS_COMPENSATIONS,
    DelayCompensation,
    MomentumCorrection,
    StalenessAwareLR,
    StalenessCompensation,
    WeightPrediction,
)

__all__ = [
    "DEFAULT_STALENESS_COMPENSATION",
    "STALENESS_COMPENSATIONS",
    "DelayCompensation",
    "MomentumCorrection",
    "StalenessAwareLR",
    "StalenessCompensation",
    "WeightPrediction",
]
