"""The ``nonfinite`` policy: what a NaN/Inf loss or gradient does, named and explained in one place.

``"error"`` (the default) stops fit with ``NonFiniteError`` naming the step, ``"skip"`` drops the update and counts
it in ``pdasgd/skipped_updates``, ``"off"`` checks nothing (the values reach the optimizer, as in plain Lightning).
The loss is checked at hand-off (``session.py``), gradients per bucket (``updates.py``; on CUDA on the device,
``device_checks.py``).
"""

from __future__ import annotations

POLICIES = ("error", "skip", "off")

SKIP_ADVICE = (
    "Pass `PDASGDStrategy(nonfinite='skip')` to drop such updates and count them in `pdasgd/skipped_updates` instead."
)


class NonFiniteError(FloatingPointError):
    """A loss or gradient was NaN or Inf; the update it would have caused was not applied."""


def validate(policy: str) -> str:
    """``policy`` if it is one of ``POLICIES``; else a ``ValueError`` naming the setting."""
    if policy not in POLICIES:
        raise ValueError(f"PDASGDStrategy: `nonfinite` must be one of {POLICIES}, got {policy!r}.")
    return policy


def error(what: str) -> NonFiniteError:
    """The error for a non-finite value found (``what`` says which, where and when), with the skip advice."""
    return NonFiniteError(f"PD-ASGD: {what} {SKIP_ADVICE}")
