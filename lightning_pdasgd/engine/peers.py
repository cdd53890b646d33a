"""What one rank's engine needs from the other replicas, as protocols: the engine never imports ``distributed``.

The Lightning integration builds a ``PeerLink`` (``distributed/replica_exchange.py``: ``ReplicaLink``) and hands it
to the session, which connects an ``Exchange`` over its current parameter buckets and reconnects after a rebuild.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

from torch import nn
from torch.optim import Optimizer

if TYPE_CHECKING:
    from lightning_pdasgd.engine.parameter_buckets import ParameterBucket


class Exchange(Protocol):
    """A running exchange of updates with the other replicas (its own thread)."""

    remote_batches: int  # batches the other ranks trained, as of the last round
    sigterm_seen: threading.Event  # some rank got SIGTERM (preemption)

    def start(self) -> None: ...

    def resume(self) -> None:
        """The loop thread trains again after a consistent point (NCCL: the exchange may issue collectives)."""

    def consistent_point(self, kind: str, stop: bool, raise_if_failed: Callable[[], None]) -> None:
        """Every rank meets here (same ``kind``) and leaves with identical replicas; ``stop`` ends the exchange."""

    def join(self, timeout: float) -> None: ...

    def abort(self, timeout: float) -> None:
        """This rank stops: tell the others, so that none of them waits for it."""

    def note_sigterm(self) -> None: ...

    def metrics(self) -> dict[str, float]: ...


class PeerLink(Protocol):
    """How a session reaches the other replicas."""

    def make_identical(self, module: nn.Module) -> None:
        """Every rank leaves with rank 0's parameters and buffers (as DDP does at the start)."""

    def connect(
        self,
        buckets: list[ParameterBucket],
        module: nn.Module,
        optimizer: Optimizer,
        on_error: Callable[[BaseException], None],
    ) -> Exchange:
        """A new (not yet started) exchange over these buckets."""

    def any_rank(self, flags: Sequence[bool]) -> list[bool]:
        """For each flag, whether it is set on any rank (ranks are synchronous: a consistent point)."""


class Replicas:
    """Several devices, as one rank's session sees them: the link, the exchange running over the current buckets,
    and whether the replicas are identical now (no step since the ranks last met).

    Args:
        link: how to reach the other replicas.
        on_consistent: called after every consistent point the ranks met at, with its kind.
        wait_timeout: the most joining the exchange thread may take.
    """

    def __init__(self, link: PeerLink, on_consistent: Callable[[str], None] | None, wait_timeout: float) -> None:
        self._link = link
        self._on_consistent = on_consistent
        self._wait_timeout = wait_timeout
        self.exchange: Exchange | None = None
        self.in_sync = True

    @property
    def asynchronous(self) -> bool:
        """Ranks train at their own pace now: a main-thread collective would make them wait for each other."""
        return self.exchange is not None and not self.in_sync

    def connect(
        self,
        buckets: list[ParameterBucket],
        module: nn.Module,
        optimizer: Optimizer,
        on_error: Callable[[BaseException], None],
    ) -> None:
        """Replicas made identical (as DDP does), then a new exchange over these buckets (``start`` starts it)."""
        self._link.make_identical(module)
        self.exchange = self._link.connect(buckets, module, optimizer, on_error)
        self.in_sync = True

    def training(self) -> None:
        """A forward starts: replicas drift apart; NCCL: the exchange thread resumes its collectives."""
        self.in_sync = False
        if self.exchange is not None:
            self.exchange.resume()

    def meet(self, kind: str, stop: bool, raise_if_failed: Callable[[], None]) -> bool:
        """Every rank meets at a consistent point of ``kind`` (all leave identical); whether they met.

        No meeting when nothing trained since the last one, except when the exchange must stop: every rank takes
        the same decision, so the ranks' handshakes always match.
        """
        if self.exchange is None or (self.in_sync and not stop):
            return False
        self.exchange.consistent_point(kind, stop, raise_if_failed)
        self.in_sync = True
        if self._on_consistent is not None:
            self._on_consistent(kind)
        return True

    def join(self) -> None:
        """After a stopping consistent point: the exchange thread has ended."""
        exchange, self.exchange = self.exchange, None
        if exchange is not None:
            exchange.join(self._wait_timeout)

    def abort(self, timeout: float) -> None:
        """This rank stops: tell the others, so that none of them waits for it."""
        exchange, self.exchange = self.exchange, None
        self.in_sync = True
        if exchange is not None:
            exchange.abort(timeout=timeout)

    def any_rank(self, flags: Sequence[bool]) -> list[bool]:
        return self._link.any_rank(flags)
