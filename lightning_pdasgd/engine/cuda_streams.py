"""CUDA ordering: batch streams for forwards and backwards, one update stream per device for the live parameters.

On CPU every function here is a no-op, so the engine keeps one code path. The rules on CUDA (DESIGN.md, "CUDA"):

- **Every write of the live parameters runs on the device's update stream** (predicted copies, optimizer
  steps, the exchange's snapshots and merges). One in-order stream makes the GPU order equal to the order in
  which the host queued the work under each bucket's lock, so a stash copy can never read a newer or half-applied
  value than the version it records, whichever thread queued it.
- A forward's stream waits for the caller's stream (its inputs); when it reads a bucket (aliasing the live
  storage, or a copy where the compensation predicts weights) it waits for the update stream; the caller's stream
  waits for the forward (Lightning reads the loss).
- An update waits for the stream autograd made current in the gradient hook (the AccumulateGrad node's stream,
  where ``.grad`` is ready), whatever stream that is.
- At the end of a backward the update stream waits for the batch stream (the stash leaves may be rewritten
  next) and an event marks the batch stream's work done; the pool hands out streams whose last backward has
  finished first. No host synchronisation anywhere in a steady-state step.
- Memory used on another stream than the one it was allocated on is marked with ``record_stream`` (the batch's
  inputs and the stash leaves on the batch stream, gradients on the update stream), so the caching allocator
  never reuses a block while a kernel of another stream may still read it.

Every API used here exists in torch 2.11 (``torch.cuda.Stream/Event``, ``wait_stream``, ``wait_event``,
``record_stream``, ``Event.query``).
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_leaves


# ----------------------------------------------------------------------------------------------- the update stream
class _UpdateStreams:
    """One update stream per CUDA device, created on first use, shared by every bucket of that device."""

    def __init__(self) -> None:
        self._streams: dict[int, Any] = {}
        self._caller_wait: dict[int, bool] = {}
        self._lock = threading.Lock()

    def get(self, device: torch.device) -> Any:
        index = device.index if device.index is not None else torch.cuda.current_device()
        stream = self._streams.get(index)
        if stream is None:
            with self._lock:
                stream = self._streams.get(index)
                if stream is None:
                    stream = torch.cuda.Stream(device=torch.device("cuda", index))
                    self._streams[index] = stream
                    self._caller_wait[index] = True  # the first copy waits for whatever set the weights up
        return stream

    def take_caller_wait(self, device: torch.device) -> bool:
        index = device.index if device.index is not None else torch.cuda.current_device()
        with self._lock:
            waiting = self._caller_wait.get(index, True)
            self._caller_wait[index] = False
        return waiting

    def request_caller_wait(self, device: torch.device) -> None:
        index = device.index if device.index is not None else torch.cuda.current_device()
        with self._lock:
            self._caller_wait[index] = True


_UPDATE_STREAMS = _UpdateStreams()


def update_stream(device: torch.device) -> Any:
    """The device's update stream (``None`` on CPU)."""
    return _UPDATE_STREAMS.get(device) if device.type == "cuda" else None


NO_STREAM = nullcontext()  # reusable: what a CPU bucket's reads and updates enter (no generator per call)


def on_update_stream(device: torch.device, wait: bool = True, join: bool = False) -> AbstractContextManager[Any]:
    """Run the body on the update stream; ``wait``: after the current stream's work (its inputs are ready there);
    ``join``: the current stream then waits for the body (it reads the result or frees what the body read).
    Off CUDA, nothing (entered on every update: no per-call context-manager object)."""
    if device.type != "cuda":
        return NO_STREAM
    return _on_cuda_update_stream(device, wait, join)


@contextmanager
def _on_cuda_update_stream(device: torch.device, wait: bool, join: bool) -> Iterator[Any]:
    stream = _UPDATE_STREAMS.get(device)
    current = torch.cuda.current_stream(device)
    if wait and current != stream:
        stream.wait_stream(current)
    with torch.cuda.stream(stream):
        yield stream
    if join and current != stream:
        current.wait_stream(stream)


def before_stash_copy(device: torch.device) -> None:
    """Called by the loop thread before queueing stash copies: after a drain (or at the start) the update stream
    first waits for the caller's stream, so changes the loop made to the weights between steps (resume, callbacks
    at consistent points) are seen. In steady state it does not, so updates never wait behind forwards."""
    if device.type == "cuda" and _UPDATE_STREAMS.take_caller_wait(device):
        _UPDATE_STREAMS.get(device).wait_stream(torch.cuda.current_stream(device))


def read_after_updates(device: torch.device, tensors: list[Tensor]) -> None:
    """A forward reads a bucket's live storage (aliasing, ``ParameterBucket.read``): the current (batch) stream
    waits for every update queued so far, and the storage is marked as used on it. After a drain the update stream
    first waits for the current stream once (changes the loop made between steps)."""
    if device.type != "cuda":
        return
    current = torch.cuda.current_stream(device)
    update = _UPDATE_STREAMS.get(device)
    if _UPDATE_STREAMS.take_caller_wait(device):
        update.wait_stream(current)
    current.wait_stream(update)
    for tensor in tensors:
        tensor.record_stream(current)


def join_update_stream(device: torch.device) -> None:
    """At a drain (loop thread): the caller's stream sees every queued update; the next stash copy waits for the
    caller's stream. No host synchronisation."""
    if device.type != "cuda":
        return
    torch.cuda.current_stream(device).wait_stream(_UPDATE_STREAMS.get(device))
    _UPDATE_STREAMS.request_caller_wait(device)


def updates_after_current(device: torch.device) -> None:
    """The update stream waits for the caller's stream: updates and merges queued from now on see what the caller
    wrote (Lightning's own optimizer step runs on the loop's stream). No host synchronisation."""
    if device.type == "cuda":
        _UPDATE_STREAMS.get(device).wait_stream(torch.cuda.current_stream(device))


def record_on_current(tensors: list[Tensor]) -> None:
    """Mark tensors allocated on another stream as used by the current one (caching-allocator safety)."""
    if tensors and tensors[0].is_cuda:
        stream = torch.cuda.current_stream(tensors[0].device)
        for tensor in tensors:
            tensor.record_stream(stream)


# ----------------------------------------------------------------------------------------------- batch streams
@dataclass(eq=False)
class BatchStream:
    """A CUDA stream that runs one in-flight batch's forward and backward, and the event after its last backward."""

    stream: Any
    device: torch.device
    done: Any = None  # event recorded when the last backward on this stream was queued completely
    busy: bool = False  # handed to a forward whose backward has not finished yet
    handed_out: int = 0  # when it was last handed out (for least-recently-used fallback)


class StreamPool:
    """CUDA streams for in-flight batches; a stream is reused only when its previous backward has finished.

    ``next()`` prefers a stream that is not busy and whose last backward's event has completed (``Event.query``,
    no host synchronisation); when all are still running it falls back to the least recently used idle one (in-order
    streams keep it correct, only concurrency is lost). ``None`` on CPU.
    """

    def __init__(self, device: torch.device, size: int) -> None:
        self._device = device
        self._streams = (
            [BatchStream(torch.cuda.Stream(device=device), device) for _ in range(max(size, 1))]
            if device.type == "cuda"
            else []
        )
        self._clock = itertools.count(1)

    def next(self) -> BatchStream | None:
        if not self._streams:
            return None
        idle = [entry for entry in self._streams if not entry.busy] or self._streams
        finished = [entry for entry in idle if entry.done is None or entry.done.query()]
        chosen = min(finished or idle, key=lambda entry: entry.handed_out)
        chosen.busy = True
        chosen.handed_out = next(self._clock)
        return chosen


@contextmanager
def forward_on(stream: BatchStream | None, inputs: Any = None) -> Iterator[None]:
    """Run a forward on ``stream``: after the caller's work, with the caller ordered after it.

    The batch's tensors (allocated on the caller's stream) are marked as used on ``stream``, since autograd frees
    saved tensors during the backward, before the stream has run it; the weights a forward reads are ordered and
    marked when each bucket is read (``read_after_updates``).
    """
    if stream is None:
        yield
        return
    caller = torch.cuda.current_stream(stream.device)
    cuda_stream = stream.stream
    cuda_stream.wait_stream(caller)
    for tensor in tree_leaves(inputs):
        if isinstance(tensor, Tensor) and tensor.is_cuda:
            tensor.record_stream(cuda_stream)
    try:
        with torch.cuda.stream(cuda_stream):
            yield
    finally:
        caller.wait_stream(cuda_stream)


@contextmanager
def backward_on(stream: BatchStream | None) -> Iterator[None]:
    """Make the batch stream current on the backward thread: autograd syncs it with every leaf stream at the end."""
    if stream is None:
        yield
        return
    with torch.cuda.stream(stream.stream):
        yield


def finish(stream: BatchStream | None) -> None:
    """After a backward and its updates were queued (backward thread, batch stream current): no host sync.

    The update stream waits for the batch stream (the stash leaves are rewritten by the next copy into them), and
    an event marks the batch stream's work so the pool can tell when the stream is free.
    """
    if stream is None:
        return
    _UPDATE_STREAMS.get(stream.device).wait_stream(stream.stream)
    done = torch.cuda.Event()
    done.record(stream.stream)
    stream.done = done
    stream.busy = False
