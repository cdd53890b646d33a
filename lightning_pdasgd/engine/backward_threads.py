"""The decoupled backward engine: a bounded hand-off, a pool of backward threads, draining and failure.

Forwards run on the thread that drives Lightning's loop; each hands its loss to this engine and goes on with the
next batch while the backward threads run the backward passes. The engine owns its threads: it starts them,
stops them (``stop``), and turns any exception raised in them into an exception in the driving thread, with the
original type and traceback, at its next interaction with the engine.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from time import monotonic  # bound once: a test or a user patching `time.monotonic` moves no engine deadline
from typing import Generic, TypeVar

from torch import Tensor

from lightning_pdasgd.errors import EngineTimeoutError

log = logging.getLogger(__name__)

_POLL_SECONDS = 0.05
_WAKE = object()  # put on the queue by `stop`: a waiting thread sees the stop now, not a poll period later
_MIN_JOIN_SECONDS = 60.0



Context = TypeVar("Context")


@dataclass(eq=False)
class BackwardWork(Generic[Context]):
    """One forward's loss, waiting for its backward pass, with what the backward needs besides the loss."""

    loss: Tensor
    context: Context
    submitted_at: float = field(default_factory=time.perf_counter)


class BackwardEngine:
    """Runs ``run_backward(work)`` on ``backward_threads`` threads, with at most ``max_in_flight`` losses pending.

    A forward first takes an in-flight slot (``acquire_slot``) so that no more than ``max_in_flight`` graphs are
    alive at once; the slot comes back when its backward finishes (or when the forward produced no loss).
    """

    def __init__(
        self,
        run_backward: Callable[[BackwardWork], None],
        backward_threads: int,
        max_in_flight: int,
        wait_timeout: float,
        name: str = "pdasgd",
        thread_setup: Callable[[], None] | None = None,
    ) -> None:
        self._run_backward = run_backward
        self._thread_setup = thread_setup  # runs first on every backward thread (its intra-op thread count)
        self._num_threads = backward_threads
        self._max_in_flight = max_in_flight
        self.wait_timeout = wait_timeout
        self._name = name
        self._queue: queue.Queue[BackwardWork] = queue.Queue(maxsize=max_in_flight)
        self._slots = threading.Semaphore(max_in_flight)
        self._pending = 0  # submitted, backward not finished
        self._pending_changed = threading.Condition()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._error_lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    # ----------------------------------------------------------------------------------------------- lifecycle
    def start(self) -> None:
        if self._threads:
            return
        self.clear_error()
        self._stop.clear()
        for index in range(self._num_threads):
            thread = threading.Thread(target=self._worker, name=f"{self._name}-backward-{index}", daemon=True)
            thread.start()
            self._threads.append(thread)
        log.debug("%s: started %d backward threads", type(self).__name__, self._num_threads)

    def reconfigure(
        self, backward_threads: int, max_in_flight: int, thread_setup: Callable[[], None] | None = None
    ) -> None:
        """Restart with another thread count and in-flight bound (the autotuner's trials); drains first."""
        self.drain()
        self.stop()
        self._thread_setup = thread_setup
        self._num_threads = backward_threads
        self._max_in_flight = max_in_flight
        self._queue = queue.Queue(maxsize=max_in_flight)
        self._slots = threading.Semaphore(max_in_flight)
        self.start()

    @property
    def max_in_flight(self) -> int:
        return self._max_in_flight

    @property
    def running(self) -> bool:
        return bool(self._threads)

    @property
    def threads(self) -> list[threading.Thread]:
        return list(self._threads)

    def stop(self, timeout: float | None = None) -> None:
        """Stop every thread: finish the backward each one runs now, drop what still waits in the queue."""
        self._stop.set()
        self._wake_one()  # every autotuner switch stops the threads: 50 ms each when they had to time out
        # a thread cannot be interrupted inside a backward pass; give the one running now time to finish it
        deadline = monotonic() + (max(self.wait_timeout, _MIN_JOIN_SECONDS) if timeout is None else timeout)
        for thread in self._threads:
            thread.join(max(deadline - monotonic(), 0.0))
        alive = [thread.name for thread in self._threads if thread.is_alive()]
        self._threads = []
        while True:  # release the graphs (and their memory) that were never run
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        with self._pending_changed:
            self._pending = 0
        self._slots = threading.Semaphore(self._max_in_flight)
        if alive:
            raise EngineTimeoutError(
                f"PD-ASGD: backward threads {alive} did not stop within `wait_timeout`"
                f" ({self.wait_timeout:g} s) while the engine shut down."
            )
        log.debug("%s: stopped", type(self).__name__)

    # ----------------------------------------------------------------------------------------------- failures
    def fail(self, error: BaseException) -> None:
        """Record the first failure of any thread; the driving thread raises it at its next interaction."""
        with self._error_lock:
            if self._error is None:
                self._error = error
        self._stop.set()

    @property
    def error(self) -> BaseException | None:
        return self._error

    def raise_if_failed(self) -> None:
        error = self._error
        if error is not None:
            raise error

    def clear_error(self) -> None:
        with self._error_lock:
            self._error = None

    # ----------------------------------------------------------------------------------------------- hand-off
    def acquire_slot(self) -> None:
        """Block until fewer than ``max_in_flight`` losses are pending (the bound on live graphs)."""
        self._wait_for(lambda: self._slots.acquire(timeout=_POLL_SECONDS), "an in-flight slot (`max_in_flight`)")

    def release_slot(self) -> None:
        self._slots.release()

    def submit(self, work: BackwardWork) -> None:
        """Queue a loss whose slot was acquired; never blocks for long since slots bound the queue."""
        self.raise_if_failed()
        with self._pending_changed:
            self._pending += 1
        try:
            self._queue.put(work, timeout=self.wait_timeout)
        except queue.Full:
            with self._pending_changed:
                self._pending -= 1
            raise EngineTimeoutError(
                f"PD-ASGD: the backward queue stayed full for `wait_timeout` ({self.wait_timeout:g} s)."
            ) from None

    @property
    def pending(self) -> int:
        return self._pending

    def drain(self) -> None:
        """Return once every submitted backward has finished and its updates are applied."""
        if not self._threads:
            self.raise_if_failed()
            return

        def drained() -> bool:
            with self._pending_changed:
                if self._pending == 0:
                    return True
                self._pending_changed.wait(_POLL_SECONDS)
                return self._pending == 0

        self._wait_for(drained, "the drain of in-flight backward passes")

    def _wait_for(self, attempt: Callable[[], bool], what: str) -> None:
        deadline = monotonic() + self.wait_timeout
        while True:
            self.raise_if_failed()
            if attempt():
                self.raise_if_failed()
                return
            if self._threads and not any(thread.is_alive() for thread in self._threads):
                raise RuntimeError(f"PD-ASGD: every backward thread has exited while waiting for {what}.")
            if monotonic() > deadline:
                raise EngineTimeoutError(
                    f"PD-ASGD: waited more than `wait_timeout` ({self.wait_timeout:g} s) for {what};"
                    f" {self._pending} backward passes still pending. Raise `PDASGDStrategy(wait_timeout=...)`"
                    " if single backward passes really take this long."
                )

    # ----------------------------------------------------------------------------------------------- workers
    def _wake_one(self) -> None:
        """Wake a thread waiting for work so it sees the stop now; each woken thread wakes the next."""
        try:
            self._queue.put_nowait(_WAKE)  # type: ignore[arg-type]
        except queue.Full:  # backward passes still queued: no thread waits long for one
            pass

    def _worker(self) -> None:
        if self._thread_setup is not None:
            try:
                self._thread_setup()
            except BaseException as error:  # noqa: BLE001 - surfaced in the driving thread
                self.fail(error)
                return
        while not self._stop.is_set():
            try:
                work = self._queue.get(timeout=_POLL_SECONDS)
            except queue.Empty:
                continue
            if work is _WAKE:  # stopping: pass the wake on (more threads than queue places), then leave
                self._wake_one()
                continue
            try:
                if not self._stop.is_set():
                    self._run_backward(work)
            except BaseException as error:  # noqa: BLE001 - surfaced in the driving thread
                log.debug("%s: backward failed", threading.current_thread().name, exc_info=True)
                self.fail(error)
            finally:
                del work
                with self._pending_changed:
                    self._pending -= 1
                    self._pending_changed.notify_all()
                self._slots.release()
