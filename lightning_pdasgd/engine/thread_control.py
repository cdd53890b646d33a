"""The engine's threads for one fit: how many, on how many cores, autotuned; the one owner of those numbers.

The configuration asks (``backward_threads``, ``max_in_flight``, ``intra_op_threads``), the autotuner and the
divergence guard change them mid-fit, and the backward engine and the CUDA stream pool follow. ``EngineThreads``
owns the backward engine, the stream pool, the autotuner and the counts in force (``ThreadSettings``); changing
them is one call (``reconfigure``), and ``shutdown`` gives back the process-wide settings the fit changed: torch's
intra-op thread count and Python's thread switch interval.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from lightning_pdasgd.engine import cuda_streams
from lightning_pdasgd.engine.autotune import (
    Candidate,
    ThreadAutotuner,
    default_candidates,
    intra_op_threads_per_thread,
    plan_trials,
)
from lightning_pdasgd.engine.backward_threads import BackwardEngine, BackwardWork
from lightning_pdasgd.engine.warmup import LossSettling

_SWITCH_INTERVAL_S = 0.001

# Set (to "1") by the engine's own tests: ``max_in_flight=1`` then runs through the engine, whose exactness they prove,
# instead of Lightning's synchronous step (what users get). Read when a fit starts.
ENGINE_AT_ONE_IN_FLIGHT = "PDASGD_ENGINE_AT_ONE_IN_FLIGHT"


def engine_at_one_in_flight() -> bool:
    """Whether one loss in flight runs through the engine (set for the engine's tests) rather than plain steps."""
    return os.environ.get(ENGINE_AT_ONE_IN_FLIGHT, "") not in ("", "0")


def runs_lightnings_step(max_in_flight: int, autotune: bool) -> bool:
    """One loss in flight without autotuning: Lightning's own synchronous step throughout (the exact mode)."""
    return max_in_flight == 1 and not autotune and not engine_at_one_in_flight()


@dataclass
class ThreadCounts:
    """One configuration of the engine's threads."""

    backward_threads: int
    max_in_flight: int
    intra_op_threads: int


class ThreadSettings:
    """The thread counts in force, and the process-wide settings to give back when the fit ends.

    Args:
        backward_threads: the configured number of backward threads.
        max_in_flight: the configured bound on losses in flight.
        intra_op_threads: the user's intra-op threads per engine thread; ``None``: the core budget.
    """

    def __init__(self, backward_threads: int, max_in_flight: int, intra_op_threads: int | None) -> None:
        self._explicit_intra_op = intra_op_threads
        self.saved_num_threads = torch.get_num_threads()
        self._saved_switch_interval: float | None = sys.getswitchinterval()
        self.counts = ThreadCounts(
            backward_threads, max_in_flight, self.intra_op_threads_for(backward_threads, max_in_flight, None)
        )

    @property
    def backward_threads(self) -> int:
        return self.counts.backward_threads

    @property
    def max_in_flight(self) -> int:
        return self.counts.max_in_flight

    @property
    def intra_op_threads(self) -> int:
        return self.counts.intra_op_threads

    def intra_op_threads_for(self, backward_threads: int, max_in_flight: int, explicit: int | None) -> int:
        """Intra-op threads for each engine thread: explicit, the user's setting, or the core budget."""
        chosen = explicit or self._explicit_intra_op
        if chosen is not None:
            return chosen
        return intra_op_threads_per_thread(self.saved_num_threads, backward_threads, max_in_flight)

    def apply(self) -> None:
        """At engine start: the forward thread's share of the cores, and a short thread switch interval (backward
        threads need the GIL for every update; Python's default 5 ms would make each wait behind the loop thread)."""
        sys.setswitchinterval(min(self._saved_switch_interval or _SWITCH_INTERVAL_S, _SWITCH_INTERVAL_S))
        torch.set_num_threads(self.intra_op_threads)

    def choose(self, backward_threads: int, max_in_flight: int, explicit_intra_op: int | None = None) -> bool:
        """Switch to these counts (the caller has drained); whether anything changed for the engine."""
        intra_op = self.intra_op_threads_for(backward_threads, max_in_flight, explicit_intra_op)
        torch.set_num_threads(intra_op)
        chosen = ThreadCounts(backward_threads, max_in_flight, intra_op)
        if chosen == self.counts:
            return False
        self.counts = chosen
        return True

    def use_every_core(self, intra_op_threads: int | None) -> None:
        """The plain synchronous step: one thread with every core (or the user's count), as plain Lightning."""
        torch.set_num_threads(intra_op_threads or self.saved_num_threads)

    def thread_setup(self) -> None:
        """Runs first on every backward thread: its share of the cores."""
        torch.set_num_threads(self.counts.intra_op_threads)

    def restore_switch_interval(self) -> None:
        if self._saved_switch_interval is not None:
            sys.setswitchinterval(self._saved_switch_interval)
            self._saved_switch_interval = None

    def restore(self) -> None:
        """Give back torch's intra-op thread count and Python's switch interval as they were before the fit."""
        torch.set_num_threads(self.saved_num_threads)
        self.restore_switch_interval()


class EngineThreads:
    """The backward engine, its CUDA streams and the autotuner, at the thread counts in force.

    Args:
        run_backward: what a backward thread runs for each queued loss.
        backward_threads, max_in_flight, intra_op_threads: the configured counts (``None``: the core budget).
        wait_timeout: the most any engine wait may take.
        device: the rank's device (CUDA: one batch stream per loss in flight).
    """

    def __init__(
        self,
        run_backward: Callable[[BackwardWork[Any]], None],
        backward_threads: int,
        max_in_flight: int,
        intra_op_threads: int | None,
        wait_timeout: float,
        device: torch.device,
    ) -> None:
        self._device = device
        self.settings = ThreadSettings(backward_threads, max_in_flight, intra_op_threads)
        self.streams = cuda_streams.StreamPool(device, max_in_flight)
        self.engine = BackwardEngine(
            run_backward,
            backward_threads=backward_threads,
            max_in_flight=max_in_flight,
            wait_timeout=wait_timeout,
            thread_setup=self.settings.thread_setup,
        )
        self.tuner: ThreadAutotuner | None = None
        self.plain_steps = False  # the autotuner chose (or is timing) the plain synchronous step
        self.warming_up = False  # the synchronous warm-up: one loss in flight, then the configured counts
        self.warmup_left = 0  # ... for this many more optimizer steps
        self.settling: LossSettling | None = None  # ... then on while the loss has not halved (``"auto"``)
        self.after_warmup = (backward_threads, max_in_flight)  # the configured counts

    def start(self, autotune: bool, autotune_steps: int, max_staleness: float, allow_synchronous: bool,
              run_steps: float, synchronous: bool = False, warmup_steps: int = 0, warmup_extension: int = 0) -> bool:
        """Start the backward threads, and the autotuner when asked; ``False`` when the run is too short to tune.

        One loss in flight without autotuning runs Lightning's own synchronous step: the exact mode is exact and
        free by construction (``ENGINE_AT_ONE_IN_FLIGHT``). ``synchronous``: that step whatever the settings.
        ``warmup_steps``: the first optimizer steps one loss in flight -- on one device (``allow_synchronous``)
        Lightning's own step, with several the engine at one loss in flight (exact as well, and the exchange runs)
        -- then the configured counts (and the autotuner's trials); up to ``warmup_extension`` more while the loss
        has not halved (``warmup.py``).
        """
        if synchronous or runs_lightnings_step(self.settings.max_in_flight, autotune):
            self.plain_steps = True
            self.settings.use_every_core(None)
            return True
        plan = None
        if autotune:
            plan = plan_trials(default_candidates(self._device, allow_synchronous), autotune_steps,
                               max(run_steps - warmup_steps, 0))
        self.settings.apply()
        if warmup_steps > 0:
            self.warming_up, self.warmup_left = True, warmup_steps
            self.settling = LossSettling(warmup_extension) if warmup_extension > 0 else None
            self.reconfigure(1, 1)
            if allow_synchronous and not engine_at_one_in_flight():  # one device: Lightning's own step, exact and
                self.plain_steps = True  # as fast as plain Lightning (through the engine: 0.54-0.66x on the MLPs)
                self.settings.use_every_core(None)
        self.engine.start()
        if plan is not None:
            candidates, steps_per_trial = plan
            self.tuner = ThreadAutotuner(candidates, steps_per_trial, max_staleness, drain=self.engine.drain)
        return plan is not None or not autotune

    @property
    def plain_steps_for_good(self) -> bool:
        """Lightning's own step, and nothing switches back to the engine (no autotuner trial, no warm-up): nothing
        of the engine is in flight between steps."""
        tuning = self.tuner is not None and not self.tuner.done
        return self.plain_steps and not tuning and not self.warming_up

    def switch_to_plain_steps(self) -> None:
        """From the next step on, Lightning's own synchronous step (drained by the caller): the divergence guard
        after a blow-up at two losses in flight, on one device."""
        cuda_streams.join_update_stream(self._device)
        self.plain_steps = True
        self.warming_up, self.settling = False, None
        self.settings.counts = ThreadCounts(self.settings.backward_threads, 1, self.settings.saved_num_threads)
        self.settings.use_every_core(None)
        self.engine.stop()
        self.settings.restore_switch_interval()

    def before_step(self, staleness: tuple[float, int], configured_in_flight: int | None) -> str | None:
        """Before a training step: let the autotuner switch configuration (a step runs wholly in one); its report
        on the step its choice is made. During the synchronous warm-up, counts its steps; the engine takes over
        after the last."""
        if self.warming_up:
            if self.warmup_left > 0:
                self.warmup_left -= 1
                return None
            if self.settling is not None and self.settling.extend():
                return None
            self.warming_up, self.settling = False, None
            self.engine.drain()
            self.plain_steps = False  # (one device warmed up with Lightning's own step)
            self.reconfigure(*self.after_warmup)  # drained: no update is lost or reordered
        tuner = self.tuner
        if tuner is None or tuner.done:
            return None
        candidate = tuner.before_step(staleness)
        if candidate is not None:
            self._apply(candidate, configured_in_flight)
        if not tuner.done:
            return None
        if self.plain_steps:  # the plain step won: nothing of the engine may cost anything from now on
            self.engine.stop()
            self.settings.restore_switch_interval()
        return tuner.report()

    def observe_warmup_loss(self, loss: torch.Tensor) -> None:
        """A warm-up step's loss, as Lightning's closure passes it to the backward (handed off, or Lightning's own
        step): ``"auto"`` ends the warm-up once it has halved."""
        if self.settling is not None:
            self.settling.observe(loss)

    def _apply(self, candidate: Candidate, configured_in_flight: int | None) -> None:
        """Switch thread counts between two steps: drained, so no update is lost or reordered."""
        self.engine.drain()
        cuda_streams.join_update_stream(self._device)  # CUDA only: a plain step's optimizer runs on the loop's stream
        self.plain_steps = candidate.synchronous
        if candidate.synchronous:  # the plain step: one thread with every core, as plain Lightning
            self.settings.use_every_core(candidate.intra_op_threads)
            return
        threads = candidate.backward_threads
        self.reconfigure(threads, configured_in_flight or threads, candidate.intra_op_threads)

    def reconfigure(self, backward_threads: int, max_in_flight: int, intra_op_threads: int | None = None) -> None:
        """New thread counts (drained by the caller): the engine's threads and the CUDA stream pool follow."""
        if self.settings.choose(backward_threads, max_in_flight, intra_op_threads):
            self.engine.reconfigure(backward_threads, max_in_flight, self.settings.thread_setup)
            self.streams = cuda_streams.StreamPool(self._device, max_in_flight)

    def shutdown(self) -> None:
        """Give back the process-wide thread settings and stop the backward threads (raises on a timeout)."""
        self.settings.restore()
        self.engine.stop()
