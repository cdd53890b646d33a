"""The loop thread's wait on the exchange thread (``wait_on_exchange``): what it reports when the thread is gone."""

from __future__ import annotations

import threading

import pytest

from lightning_pdasgd.distributed.replica_exchange import wait_on_exchange


class _SetDuringTheWait(threading.Event):
    """An event whose first ``wait`` times out while the exchange thread sets it: the race at a stopping point,
    where the thread's last round sets the event and the thread ends between the loop thread's two checks."""

    def __init__(self) -> None:
        super().__init__()
        self.waits = 0

    def wait(self, timeout: float | None = None) -> bool:
        self.waits += 1
        if self.waits == 1:
            self.set()
            return False
        return super().wait(timeout)


def _finished_thread() -> threading.Thread:
    thread = threading.Thread(target=lambda: None)
    thread.start()
    thread.join()
    return thread


def test_a_point_reached_just_before_the_thread_stopped_is_reached() -> None:
    """A CI run failed at `fit_end` with "the exchange thread stopped before the live replicas reached the
    'fit_end' consistent point" although the thread had reached it: the event is read again once the thread is gone."""
    event, thread = _SetDuringTheWait(), _finished_thread()
    wait_on_exchange(event, lambda: thread, 60.0, lambda: None, "the 'fit_end' consistent point", "")
    assert event.waits == 1


def test_a_thread_that_stopped_before_the_point_is_an_error_naming_it() -> None:
    thread = _finished_thread()
    with pytest.raises(RuntimeError, match="stopped before the 'fit_end' consistent point"):
        wait_on_exchange(threading.Event(), lambda: thread, 60.0, lambda: None, "the 'fit_end' consistent point", "")
