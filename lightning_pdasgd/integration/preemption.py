"""Preemption: SIGTERM or Ctrl-C ends fit at a consistent point with a checkpoint Lightning resumes from.

With several devices the signal may reach one rank only, and Lightning's own per-batch check broadcasts a flag on
the default group before every batch, which would make every rank wait for the slowest at every step. PD-ASGD
carries the flag on the exchange thread instead; when any rank got it, every rank drains, the replicas merge, and
Lightning's ``SIGTERMException`` takes its usual exit path, on which the strategy writes ``hpc_ckpt_<n>.ckpt``.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import threading
from typing import Any

from lightning_pdasgd import _flavor
from lightning_pdasgd.engine.session import FitSession

from . import _lightning_internals
from ._lightning import FLAVOR

log = logging.getLogger(__name__)


def is_preemption(exception: BaseException) -> bool:
    """SIGTERM (either Lightning package's ``SIGTERMException``: the Trainer's loop raises its own) or Ctrl-C."""
    return isinstance(exception, (*_flavor.every_imported("utilities.exceptions.SIGTERMException"), KeyboardInterrupt))


def next_hpc_checkpoint_path(directory: str) -> str:
    """The next ``hpc_ckpt_<n>.ckpt`` in ``directory``: the name ``fit(ckpt_path="hpc")`` resumes from."""
    os.makedirs(directory, exist_ok=True)
    numbers = [
        int(match.group(1))
        for name in os.listdir(directory)
        if (match := re.fullmatch(r"hpc_ckpt_(\d+)\.ckpt", name)) is not None
    ]
    return os.path.join(directory, f"hpc_ckpt_{max(numbers, default=0) + 1}.ckpt")


def save_checkpoint(strategy: Any) -> None:
    """Write ``hpc_ckpt_<n>.ckpt`` (Lightning's preemption file name) through ``trainer.save_checkpoint``.

    The save drains the engine first; with several devices the SIGTERM path reached a consistent point before
    the exception, so every rank holds the merged replica and rank 0 writes it.
    """
    module = strategy.lightning_module
    if module is None or module._trainer is None:
        return
    trainer = module.trainer
    path = strategy.broadcast(next_hpc_checkpoint_path(str(trainer.default_root_dir)))
    trainer.save_checkpoint(path)
    log.info("PD-ASGD: preemption checkpoint written to %s", path)


def watch_sigterm_through_exchange(trainer: Any, session: FitSession) -> None:
    """Several devices: SIGTERM sets a flag the exchange shares; each rank checks it before every batch.

    Lightning restores its original signal handlers when fit ends.
    """

    def on_sigterm(signum: int, frame: Any) -> None:  # no collective inside a signal handler: a flag only
        if session.exchange is not None:
            session.exchange.note_sigterm()

    sigterm_exception = (_flavor.of(trainer) or FLAVOR).attribute("utilities.exceptions.SIGTERMException")

    def check() -> None:
        exchange = session.exchange
        if exchange is None or not exchange.sigterm_seen.is_set():
            return
        session.reach_consistent_point("preempt", stop=True)
        raise sigterm_exception()  # the Trainer's own package's, which its loop and users catch

    _lightning_internals.replace_sigterm_broadcast(trainer, check)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_sigterm)
