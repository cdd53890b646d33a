"""The backward engine on its own (no Trainer): its threads, the in-flight bound, draining, failures, shutdown.

The work functions coordinate with the test through ``threading.Event``s and barriers only; the one timed wait
in a correctness check is a *negative* one ("has not happened yet"), kept short. Every engine gets a test-specific
thread name so that ``threading.enumerate()`` shows exactly its threads (and the autouse fixture in ``conftest.py``
still sees any ``pdasgd-`` thread that leaks).
"""

from __future__ import annotations

import threading
import traceback
from collections import Counter
from collections.abc import Callable, Iterator

import pytest
import torch

from lightning_pdasgd.engine.backward_threads import BackwardEngine, BackwardWork, EngineTimeoutError

WAIT_S = 10.0  # upper bound for things that must happen (never reached when the engine works)
NOT_YET_S = 0.1  # how long a "has not happened" check watches
SHORT_TIMEOUT_S = 0.2  # the engine's `wait_timeout` where a test expects a wait to time out
NAME = "pdasgd-unit"


def _engine_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name.startswith(f"{NAME}-")]


def _work(tag: object) -> BackwardWork:
    return BackwardWork(loss=torch.zeros(()), context=tag)


def _submit(engine: BackwardEngine, tag: object) -> None:
    """What a forward does: take a slot, then hand its loss over."""
    engine.acquire_slot()
    engine.submit(_work(tag))


@pytest.fixture
def make_engine() -> Iterator[Callable[..., BackwardEngine]]:
    """Builds engines and stops every one of them at the end, whatever the test did to it."""
    engines: list[BackwardEngine] = []

    def make(run: Callable[[BackwardWork], None], threads: int = 2, in_flight: int = 4,
             timeout: float = WAIT_S, start: bool = True, **kwargs: object) -> BackwardEngine:
        engine = BackwardEngine(run, backward_threads=threads, max_in_flight=in_flight, wait_timeout=timeout,
                                name=NAME, **kwargs)
        engines.append(engine)
        if start:
            engine.start()
        return engine

    yield make
    for engine in engines:
        engine.stop(timeout=WAIT_S)
    assert _engine_threads() == []


class _Gate:
    """A work function that records which works started and finished, and blocks each until ``open``."""

    def __init__(self, closed: bool = True) -> None:
        self.lock = threading.Lock()
        self.started: list[object] = []
        self.finished: list[object] = []
        self.started_event = threading.Event()
        self.opened = threading.Event()
        if not closed:
            self.opened.set()

    def __call__(self, work: BackwardWork) -> None:
        with self.lock:
            self.started.append(work.context)
        self.started_event.set()
        if not self.opened.wait(WAIT_S):
            raise TimeoutError("the test never opened the gate")
        with self.lock:
            self.finished.append(work.context)


# ----------------------------------------------------------------------------------------------- running work
def test_every_submitted_work_runs_exactly_once_on_a_backward_thread(make_engine) -> None:
    """Each work is handed to ``run_backward`` once (none lost, none repeated) and on an engine thread, not the
    caller's."""
    runs: Counter[int] = Counter()
    thread_names: set[str] = set()
    lock = threading.Lock()

    def run(work: BackwardWork) -> None:
        with lock:
            runs[work.context] += 1
            thread_names.add(threading.current_thread().name)

    engine = make_engine(run, threads=2, in_flight=3)
    for tag in range(50):
        _submit(engine, tag)
    engine.drain()
    assert runs == Counter(range(50))
    assert engine.pending == 0
    assert thread_names and thread_names <= {thread.name for thread in engine.threads}
    assert threading.current_thread().name not in thread_names


def test_several_backward_threads_run_works_concurrently(make_engine) -> None:
    """With two backward threads, two works run at the same time (each waits at a 2-party barrier that only the
    other can pass): the pool is a real pool, not one thread taking turns."""
    barrier = threading.Barrier(2, timeout=WAIT_S)
    engine = make_engine(lambda work: barrier.wait(), threads=2, in_flight=2)
    _submit(engine, "a")
    _submit(engine, "b")
    engine.drain()  # a broken barrier (only one thread running) would surface here as BrokenBarrierError
    assert engine.error is None


# ----------------------------------------------------------------------------------------------- in-flight bound
def test_acquire_times_out_when_every_slot_is_taken_and_a_release_frees_one(make_engine) -> None:
    """``max_in_flight`` bounds the slots: one more ``acquire_slot`` raises ``EngineTimeoutError`` after
    ``wait_timeout``; ``release_slot`` gives one back."""
    engine = make_engine(lambda work: None, in_flight=2, timeout=SHORT_TIMEOUT_S, start=False)
    engine.acquire_slot()
    engine.acquire_slot()
    with pytest.raises(EngineTimeoutError, match="in-flight slot"):
        engine.acquire_slot()
    engine.release_slot()
    engine.acquire_slot()  # does not raise: the released slot is free again


def test_a_full_engine_blocks_the_next_forward_until_a_backward_finishes(make_engine) -> None:
    """While ``max_in_flight`` backwards run, ``acquire_slot`` blocks; the slot of a finished backward comes back
    by itself (the worker releases it) and unblocks the waiting forward."""
    gate = _Gate()
    engine = make_engine(gate, threads=1, in_flight=1)
    _submit(engine, "first")
    assert gate.started_event.wait(WAIT_S)

    acquired = threading.Event()
    errors: list[BaseException] = []

    def next_forward() -> None:
        try:
            engine.acquire_slot()
            acquired.set()
        except BaseException as error:  # noqa: BLE001 - reported by the test
            errors.append(error)

    forward = threading.Thread(target=next_forward)
    forward.start()
    assert not acquired.wait(NOT_YET_S), "a slot was handed out beyond max_in_flight"
    gate.opened.set()
    forward.join(WAIT_S)
    assert acquired.is_set() and not errors
    engine.release_slot()
    engine.drain()
    assert gate.finished == ["first"]


# ----------------------------------------------------------------------------------------------- drain
def test_drain_returns_only_after_every_submitted_work_has_finished(make_engine) -> None:
    """``drain`` blocks while backwards are pending and returns once all of them have finished."""
    gate = _Gate()
    engine = make_engine(gate, threads=2, in_flight=4)
    for tag in range(4):
        _submit(engine, tag)
    finished_at_return: list[int] = []
    drained = threading.Event()

    def drainer() -> None:
        engine.drain()
        with gate.lock:
            finished_at_return.append(len(gate.finished))
        drained.set()

    thread = threading.Thread(target=drainer)
    thread.start()
    assert not drained.wait(NOT_YET_S), "drain returned while backwards were still pending"
    gate.opened.set()
    thread.join(WAIT_S)
    assert drained.is_set()
    assert finished_at_return == [4]
    assert engine.pending == 0


def test_drain_times_out_when_a_backward_never_finishes(make_engine) -> None:
    """A backward stuck past ``wait_timeout`` makes ``drain`` raise ``EngineTimeoutError`` naming the wait,
    instead of hanging the training loop."""
    gate = _Gate()
    engine = make_engine(gate, threads=1, in_flight=1, timeout=SHORT_TIMEOUT_S)
    _submit(engine, "stuck")
    with pytest.raises(EngineTimeoutError, match="drain"):
        engine.drain()
    gate.opened.set()


# ----------------------------------------------------------------------------------------------- failures
class _Boom(ValueError):
    pass


def _explode(work: BackwardWork) -> None:
    if work.context == "bad":
        raise _Boom("backward failed")


def test_a_backward_failure_is_raised_by_drain_with_its_original_traceback(make_engine) -> None:
    """The exception of a backward thread reaches the driving thread as the same object, its traceback still
    pointing into the function that raised it."""
    engine = make_engine(_explode, threads=1, in_flight=2)
    _submit(engine, "bad")
    with pytest.raises(_Boom) as caught:
        engine.drain()
    assert caught.value is engine.error
    frames = [frame.name for frame in traceback.extract_tb(caught.value.__traceback__)]
    assert "_explode" in frames


def test_a_backward_failure_is_raised_by_the_next_submit(make_engine) -> None:
    """After a backward failed, the next hand-off raises that failure instead of queueing more work."""
    ran: list[object] = []
    engine = make_engine(lambda work: (ran.append(work.context), _explode(work)), threads=1, in_flight=2)
    (thread,) = engine.threads
    _submit(engine, "bad")
    thread.join(WAIT_S)  # a failure stops the threads: once joined, it is recorded
    assert not thread.is_alive()
    with pytest.raises(_Boom):
        engine.submit(_work("after"))
    assert ran == ["bad"]


def test_a_failing_thread_setup_surfaces_in_the_driving_thread(make_engine) -> None:
    """``thread_setup`` runs on each backward thread first; its exception is raised at the next interaction."""

    def setup() -> None:
        raise _Boom("setup failed")

    engine = make_engine(lambda work: None, threads=1, in_flight=1, thread_setup=setup)
    engine.threads[0].join(WAIT_S)
    with pytest.raises(_Boom, match="setup failed"):
        engine.acquire_slot()


# ----------------------------------------------------------------------------------------------- lifecycle
def test_stop_joins_every_thread_it_started(make_engine) -> None:
    """``start`` adds exactly ``backward_threads`` named threads; ``stop`` leaves ``threading.enumerate()`` as it
    was before ``start``."""
    before = set(threading.enumerate())
    engine = make_engine(lambda work: None, threads=3, in_flight=3)
    started = set(threading.enumerate()) - before
    assert started == set(engine.threads)
    assert sorted(thread.name for thread in started) == [f"{NAME}-backward-{i}" for i in range(3)]
    assert engine.running
    engine.stop()
    assert set(threading.enumerate()) == before
    assert not engine.running and engine.threads == []


def test_stop_finishes_the_running_backward_and_drops_queued_ones(make_engine) -> None:
    """``stop`` cannot interrupt a backward: past its timeout it raises ``EngineTimeoutError`` naming the threads;
    the work still queued is dropped (never run), and the running one finishes."""
    gate = _Gate()
    engine = make_engine(gate, threads=1, in_flight=2)
    (thread,) = engine.threads
    _submit(engine, "running")
    assert gate.started_event.wait(WAIT_S)
    _submit(engine, "queued")
    with pytest.raises(EngineTimeoutError, match="did not stop"):
        engine.stop(timeout=SHORT_TIMEOUT_S)
    gate.opened.set()
    thread.join(WAIT_S)
    assert not thread.is_alive()
    assert gate.started == ["running"] and gate.finished == ["running"]


def test_reconfigure_restarts_with_the_new_thread_count_and_bound(make_engine) -> None:
    """``reconfigure`` drains, replaces the threads by ``backward_threads`` new ones, and the new in-flight bound
    holds; work submitted afterwards runs on the new threads."""
    ran: list[tuple[object, str]] = []
    engine = make_engine(lambda work: ran.append((work.context, threading.current_thread().name)), threads=1,
                         in_flight=1, timeout=SHORT_TIMEOUT_S)
    old = engine.threads
    _submit(engine, "before")
    engine.reconfigure(backward_threads=3, max_in_flight=2)
    assert [tag for tag, _ in ran] == ["before"]  # drained first
    assert not any(thread.is_alive() for thread in old)
    new = engine.threads
    assert len(new) == 3 and all(thread.is_alive() for thread in new)
    assert set(_engine_threads()) == set(new)
    engine.acquire_slot()
    engine.acquire_slot()  # two slots now
    with pytest.raises(EngineTimeoutError):
        engine.acquire_slot()
    engine.submit(_work("after"))
    engine.release_slot()
    engine.drain()
    assert ran[1][0] == "after" and ran[1][1] in {thread.name for thread in new}
