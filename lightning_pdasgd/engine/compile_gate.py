"""Keeps ``torch.compile`` on one thread from changing what an optimizer step computes on another.

While dynamo compiles a frame, torch 2.14 holds one process-wide flag up (``torch.compiler.is_compiling()`` is True
on every thread), and torch's optimizers branch on it: Adam's and AdamW's step read ``_get_value`` and
``_stack_if_compiling`` at different moments, so a step on a backward thread that overlaps a compile on the forward
thread (a compiled submodule meeting a new shape, e.g. an epoch's smaller last batch) mixes both branches and fails.
The gate makes the two exclude each other: a compile session waits for the engine's steps in progress on other
threads (milliseconds), and a step waits for a compile session to end. One thread may do both (a compiled optimizer).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from lightning_pdasgd.engine import _torch_internals
from lightning_pdasgd.errors import EngineTimeoutError

# the longest a step waits for a compile on another thread (inductor can take minutes on a large model), and a
# compile for the steps in progress (milliseconds); past it the compile goes on as torch's own would
COMPILE_WAIT_S = 1800.0
STEPS_WAIT_S = 60.0


class CompileGate:
    """Steps of the engine and compile sessions of dynamo, never at the same time on different threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # a step takes only this (0.7 us in all); the condition: waits
        self._changed = threading.Condition(self._lock)
        self._steps: dict[int, int] = {}  # thread ident -> the engine's steps in progress on it
        self._compiling: int | None = None  # the thread in a compile session
        self._depth = 0  # nested sessions of that thread
        self._compile_waits = 0  # compile sessions waiting for steps to end
        self.sessions = 0  # compile sessions seen (the tests read it: dynamo's sessions do come through here)

    def step_started(self) -> None:
        """Before one optimizer step of the engine (``step_ended`` after it, in a ``finally``)."""
        me = threading.get_ident()
        with self._lock:
            if self._compiling is not None and self._compiling != me:
                free = self._changed.wait_for(lambda: self._compiling in (None, me), timeout=COMPILE_WAIT_S)
                if not free:
                    raise EngineTimeoutError(
                        f"PD-ASGD: an update waited {COMPILE_WAIT_S:g} s for torch.compile on another thread to finish"
                        " compiling; compile the model before the fit, or pass `max_in_flight=1`."
                    )
            self._steps[me] = self._steps.get(me, 0) + 1

    def step_ended(self) -> None:
        me = threading.get_ident()
        with self._lock:
            left = self._steps.pop(me) - 1
            if left:
                self._steps[me] = left
            if self._compile_waits:
                self._changed.notify_all()

    @contextmanager
    def compiling(self) -> Iterator[None]:
        """Around one compile session (dynamo's, on any thread)."""
        me = threading.get_ident()
        with self._lock:
            if self._compiling == me:
                self._depth += 1
            else:
                self._compile_waits += 1
                try:
                    self._changed.wait_for(lambda: self._compiling is None and set(self._steps) <= {me},
                                           timeout=STEPS_WAIT_S)
                finally:
                    self._compile_waits -= 1
                self._compiling, self._depth = me, 1
                self.sessions += 1
        try:
            yield
        finally:
            with self._lock:
                self._depth -= 1
                if self._depth == 0:
                    self._compiling = None
                    self._changed.notify_all()


GATE = CompileGate()


def install() -> None:
    """Route dynamo's compile sessions through the gate (once per process; a no-op where torch has no such
    session). The gate costs nothing while no engine step runs."""
    _torch_internals.wrap_compile_sessions(GATE.compiling)
