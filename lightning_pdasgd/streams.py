"""CUDA streams for in-flight batches: each batch's forward and backward kernels run on one stream of its own.

On CPU every method is a no-op, so the engine has a single code path. The hand-offs are ordered with stream waits:
a forward's stream waits for the stream that produced its inputs, the caller's stream waits for the forward before
Lightning reads the loss, and a backward runs on its forward's stream (autograd also replays each backward op on
the stream of its forward op).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch


class StreamPool:
    """Round-robin CUDA streams, one per possible in-flight batch."""

    def __init__(self, device: torch.device, size: int) -> None:
        self._streams = [torch.cuda.Stream(device=device) for _ in range(size)] if device.type == "cuda" else []
        self._cycle = itertools.cycle(self._streams) if self._streams else None

    def next(self) -> Any:
        return next(self._cycle) if self._cycle is not None else None


@contextmanager
def forward_on(stream: Any) -> Iterator[None]:
    """Run a forward on ``stream``, ordered after the caller's work, and order the caller after it."""
    if stream is None:
        yield
        return
    caller = torch.cuda.current_stream(stream.device)
    stream.wait_stream(caller)
    try:
        with torch.cuda.stream(stream):
            yield
    finally:
        caller.wait_stream(stream)


def backward_on(stream: Any) -> Any:
    return torch.cuda.stream(stream) if stream is not None else nullcontext()


def finish(stream: Any) -> None:
    """Block the backward thread until its stream is done, so the graph's memory is released only when unused."""
    if stream is not None:
        stream.synchronize()
