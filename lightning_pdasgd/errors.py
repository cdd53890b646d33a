"""Every exception lightning-pdasgd raises, in one Lightning-free module that loads once.

One module so that a user's ``except`` clause, the engine (which raises most of them) and both Lightning flavours
(``_flavor.py``) all name the same classes.
"""

from __future__ import annotations


class EngineTimeoutError(TimeoutError):
    """A wait of the engine exceeded ``wait_timeout`` (or, for an update waiting for torch.compile on another
    thread, ``compile_gate.COMPILE_WAIT_S``); the message names the wait."""


class NonFiniteError(FloatingPointError):
    """A loss or gradient was NaN or Inf; the update it would have caused was not applied."""


class RankFailedError(RuntimeError):
    """Another rank failed; this rank stops too instead of waiting for it."""


class ConsistentPointMismatchError(RuntimeError):
    """Ranks reached different kinds of consistent point, so their Lightning loops have diverged."""


class StepMismatchError(RuntimeError):
    """Ranks disagree on the step count at a consistent point: a bug in the step accounting, never a setting."""


class ConfigurationError(ValueError):
    """The classes named in a config could not be built from it; the message is the short form, ``__cause__`` the
    original error."""


class ReportError(Exception):
    """A report that cannot be made; ``exit_code`` is what the command returns."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code
