"""Which of a fit's batches are finished: every update of theirs applied to this replica, or never to be.

Batches are numbered in the order their forwards run (the order the training data yields them). Backward threads
finish them out of order; the *frontier* is the count of leading batches that are all finished. The fault-tolerant
mode marks exactly these batches as trained in the replicas' claim ledger, so a batch whose update is still in flight
is never counted as trained.
"""

from __future__ import annotations

import threading


class CompletionFrontier:
    """Numbers batches in forward order and counts how many leading ones have finished."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._next = 0
        self._finished_ahead: set[int] = set()
        self.frontier = 0  # batches 0 .. frontier-1 are all finished

    @property
    def begun(self) -> int:
        """Forwards started so far."""
        return self._next

    def begin(self) -> int:
        """A forward starts: its batch's number."""
        with self._lock:
            number = self._next
            self._next += 1
            return number

    def finish(self, number: int | None) -> None:
        """Batch ``number`` applied its last update (or none will be applied); ``None``: a batch never numbered."""
        if number is None:
            return
        with self._lock:
            self._finished_ahead.add(number)
            while self.frontier in self._finished_ahead:
                self._finished_ahead.remove(self.frontier)
                self.frontier += 1
