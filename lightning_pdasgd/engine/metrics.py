"""Counters the engine keeps while it trains, and the names under which they are logged.

Updates are counted per backward pass by the thread that ran it, then merged here once under a lock, so the
per-parameter hot path never takes a shared lock for bookkeeping.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from time import perf_counter
from typing import TYPE_CHECKING, Any

from torch import Tensor

if TYPE_CHECKING:
    from lightning_pdasgd.engine.layerwise_updates import LayerwiseUpdater
    from lightning_pdasgd.engine.session import FitSession

STALENESS_MEAN = "pdasgd/staleness_mean"
STALENESS_MAX = "pdasgd/staleness_max"
QUEUE_DEPTH = "pdasgd/queue_depth"
FORWARD_MS = "pdasgd/forward_ms"
BACKWARD_MS = "pdasgd/backward_ms"
UPDATES_PER_SECOND = "pdasgd/updates_per_sec"
SAMPLES_PER_SECOND = "pdasgd/samples_per_sec"
GRAD_NORM = "pdasgd/grad_norm"
SKIPPED_UPDATES = "pdasgd/skipped_updates"
FORWARD_BUSY = "pdasgd/forward_busy"
BACKWARD_BUSY = "pdasgd/backward_busy"
WALL_TIME = "pdasgd/wall_time_s"
BACKWARD_THREADS = "pdasgd/backward_threads"  # 0: the plain synchronous step (chosen by the autotuner)
REPLICA_DIVERGENCE = "pdasgd/replica_divergence"
# the engine's own cost per step, in milliseconds: copying the weights, handing the loss off, applying updates
STASH_MS = "pdasgd/stash_ms"
HANDOFF_MS = "pdasgd/handoff_ms"
UPDATE_MS = "pdasgd/update_ms"
GUARD_TRIPS = "pdasgd/guard_trips"  # blow-ups the divergence guard caught (divergence_guard.py)
# staleness by depth: the bucket the forward reaches first (input side) and last (output side)
STALENESS_FRACTION_PREFIX = "pdasgd/staleness_frac_"  # + a staleness bucket's label
EXCHANGE_ROUNDS = "pdasgd/exchange_rounds"  # several devices (replica_exchange.py)
EXCHANGE_MS = "pdasgd/exchange_ms"
EXCHANGE_CPU_FRACTION = "pdasgd/exchange_cpu_frac"
STALENESS_FIRST_BUCKET = "pdasgd/staleness_first_bucket"
STALENESS_LAST_BUCKET = "pdasgd/staleness_last_bucket"
# `metrics="basic"` (the default) logs these; "full" logs every metric; "off" none
BASIC_METRICS = frozenset(
    {SAMPLES_PER_SECOND, STALENESS_MEAN, STALENESS_MAX, QUEUE_DEPTH, WALL_TIME, SKIPPED_UPDATES, REPLICA_DIVERGENCE,
     GUARD_TRIPS}
)
PROGRESS_BAR_METRICS = (SAMPLES_PER_SECOND, STALENESS_MEAN)
# staleness histogram: the fraction of updates whose staleness falls in each bucket (any logger can plot scalars)
STALENESS_BUCKETS: tuple[tuple[int, int, str], ...] = (
    (0, 0, "0"),
    (1, 1, "1"),
    (2, 2, "2"),
    (3, 4, "3-4"),
    (5, 8, "5-8"),
    (9, 1 << 62, "9+"),
)
_BUCKET_OF = [next(i for i, (lo, hi, _) in enumerate(STALENESS_BUCKETS) if lo <= s <= hi) for s in range(9)]


def staleness_bucket(staleness: int) -> int:
    return _BUCKET_OF[staleness] if staleness < 9 else len(STALENESS_BUCKETS) - 1


@dataclass
class BackwardRecord:
    """What one backward pass did; written only by the thread running it."""

    updates: int = 0
    staleness_sum: int = 0
    staleness_max: int = 0
    grad_sq_sum: float = 0.0
    seconds: float = 0.0
    update_seconds: float = 0.0  # checks, clipping and optimizer steps of this backward's buckets
    skipped: int = 0  # parameter updates dropped for a non-finite gradient (policy "skip")
    histogram: list[int] = field(default_factory=lambda: [0] * len(STALENESS_BUCKETS))
    # [staleness sum, updates] of the bucket the forward reaches first, and of the one it reaches last
    first_bucket: list[int] = field(default_factory=lambda: [0, 0])
    last_bucket: list[int] = field(default_factory=lambda: [0, 0])

    @staticmethod
    def add_depth(depth: list[int], staleness: int) -> None:
        depth[0] += staleness
        depth[1] += 1

    def add_update(self, staleness: int, parameters: int = 1) -> None:
        """``parameters`` parameters were updated together (one bucket), each with this staleness."""
        self.updates += parameters
        self.staleness_sum += staleness * parameters
        self.histogram[staleness_bucket(staleness)] += parameters
        if staleness > self.staleness_max:
            self.staleness_max = staleness


@dataclass
class StatsWindow:
    """Aggregates since the last time the strategy logged (one logging window)."""

    updates: int = 0
    staleness_sum: int = 0
    staleness_max: int = 0
    backwards: int = 0
    backward_seconds: float = 0.0
    forwards: int = 0
    forward_seconds: float = 0.0
    samples: int = 0
    grad_sq_sum: float = 0.0
    skipped: int = 0
    stash_seconds: float = 0.0
    handoff_seconds: float = 0.0
    update_seconds: float = 0.0
    histogram: list[int] = field(default_factory=lambda: [0] * len(STALENESS_BUCKETS))
    first_bucket: list[int] = field(default_factory=lambda: [0, 0])
    last_bucket: list[int] = field(default_factory=lambda: [0, 0])
    started_at: float = field(default_factory=time.perf_counter)

    def as_metrics(self, queue_depth: int, log_grad_norm: bool, backward_threads: int) -> dict[str, float]:
        elapsed = max(perf_counter() - self.started_at, 1e-9)
        metrics = {
            SAMPLES_PER_SECOND: self.samples / elapsed,
            FORWARD_BUSY: min(self.forward_seconds / elapsed, 1.0),
        }
        if self.backwards or self.skipped or queue_depth:  # the engine ran (not the plain step): its figures
            metrics[QUEUE_DEPTH] = float(queue_depth)
            metrics[UPDATES_PER_SECOND] = self.updates / elapsed
            metrics[SKIPPED_UPDATES] = float(self.skipped)
            metrics[BACKWARD_BUSY] = min(self.backward_seconds / (elapsed * max(backward_threads, 1)), 1.0)
        if self.updates:
            metrics[STALENESS_MEAN] = self.staleness_sum / self.updates
            metrics[STALENESS_MAX] = float(self.staleness_max)
            for (_, _, label), count in zip(STALENESS_BUCKETS, self.histogram):
                metrics[f"{STALENESS_FRACTION_PREFIX}{label}"] = count / self.updates
        for name, (total, updates) in ((STALENESS_FIRST_BUCKET, self.first_bucket),
                                       (STALENESS_LAST_BUCKET, self.last_bucket)):
            if updates:
                metrics[name] = total / updates
        if self.forwards:
            metrics[FORWARD_MS] = 1000.0 * self.forward_seconds / self.forwards
            metrics[STASH_MS] = 1000.0 * self.stash_seconds / self.forwards
            metrics[HANDOFF_MS] = 1000.0 * self.handoff_seconds / self.forwards
        if self.backwards:
            metrics[BACKWARD_MS] = 1000.0 * self.backward_seconds / self.backwards
            metrics[UPDATE_MS] = 1000.0 * self.update_seconds / self.backwards
            if log_grad_norm:
                metrics[GRAD_NORM] = (self.grad_sq_sum / self.backwards) ** 0.5
        return metrics


class EngineStats:
    """Thread-safe totals and the current logging window."""

    def __init__(self) -> None:
        self.started_at = perf_counter()  # the fit's start, for `pdasgd/wall_time_s`
        self._lock = threading.Lock()
        self._window = StatsWindow()
        self.total_updates = 0
        self.total_backwards = 0
        self.total_staleness_sum = 0
        self.total_staleness_max = 0
        self.total_skipped = 0
        self.total_forwards = 0
        self.total_samples = 0
        self.total_stash_seconds = 0.0  # the engine's own cost, for benchmarks' per-step overhead
        self.total_handoff_seconds = 0.0
        self.total_update_seconds = 0.0
        self.guard_trips = 0  # blow-ups the divergence guard caught, over every fit of the strategy
        self.total_grad_sq_sum = 0.0  # squared gradient norms of every backward (CPU), for the divergence guard

    def record_skipped_loss(self, parameters: int) -> None:
        """A non-finite loss under policy "skip": none of its parameters' updates happen."""
        with self._lock:
            self._window.skipped += parameters
            self.total_skipped += parameters

    def record_backward(self, record: BackwardRecord, ran_backward: bool = True) -> None:
        """Add one backward's record; ``ran_backward=False``: updates made without a backward of their own (an
        accumulation window closed by a dropped loss)."""
        with self._lock:
            window = self._window
            window.updates += record.updates
            window.staleness_sum += record.staleness_sum
            window.staleness_max = max(window.staleness_max, record.staleness_max)
            window.backwards += int(ran_backward)
            window.backward_seconds += record.seconds
            window.grad_sq_sum += record.grad_sq_sum
            self.total_grad_sq_sum += record.grad_sq_sum
            window.skipped += record.skipped
            window.update_seconds += record.update_seconds
            self.total_update_seconds += record.update_seconds
            for index, count in enumerate(record.histogram):
                window.histogram[index] += count
            for mine, theirs in ((window.first_bucket, record.first_bucket), (window.last_bucket, record.last_bucket)):
                mine[0] += theirs[0]
                mine[1] += theirs[1]
            self.total_skipped += record.skipped
            self.total_updates += record.updates
            self.total_backwards += int(ran_backward)
            self.total_staleness_sum += record.staleness_sum
            self.total_staleness_max = max(self.total_staleness_max, record.staleness_max)

    def record_forward(self, seconds: float, samples: int, stash_seconds: float = 0.0, forwards: int = 1) -> None:
        """``forwards`` forwards together (Lightning's own step counts a window's steps at once: ``step_metrics``)."""
        with self._lock:
            self._window.forwards += forwards
            self._window.forward_seconds += seconds
            self._window.samples += samples
            self._window.stash_seconds += stash_seconds
            self.total_forwards += forwards
            self.total_samples += samples
            self.total_stash_seconds += stash_seconds

    def record_handoff(self, seconds: float) -> None:
        with self._lock:
            self._window.handoff_seconds += seconds
            self.total_handoff_seconds += seconds

    def gradient_totals(self) -> tuple[float, int]:
        """(sum of squared gradient norms, backwards) so far: the guard reads the mean norm of new backwards."""
        with self._lock:
            return self.total_grad_sq_sum, self.total_backwards

    def take_window(self) -> StatsWindow:
        """Hand back the finished window and start a new one."""
        with self._lock:
            window, self._window = self._window, StatsWindow()
        return window

    @property
    def mean_staleness(self) -> float:
        with self._lock:
            return self.total_staleness_sum / self.total_updates if self.total_updates else 0.0


def window_metrics(session: FitSession) -> dict[str, float]:
    """A fit session's statistics since the previous call, under their ``pdasgd/`` names."""
    threads = session.threads
    backward_threads = threads.settings.backward_threads
    metrics = session.stats.take_window().as_metrics(
        threads.engine.pending, session.config.log_grad_norm, backward_threads
    )
    metrics[WALL_TIME] = perf_counter() - session.stats.started_at
    metrics[BACKWARD_THREADS] = 0.0 if threads.plain_steps else float(backward_threads)
    if session.config.divergence_guard and (session.config.in_flight > 1 or session.stats.guard_trips):
        metrics[GUARD_TRIPS] = float(session.stats.guard_trips)  # (one loss in flight configured: no guard runs)
    if session.exchange is not None:
        metrics.update(session.exchange.metrics())
    return metrics


def window_due(session: FitSession, module: Any) -> tuple[dict[str, float], dict[str, float]] | None:
    """A session's window of statistics when Lightning writes to its loggers, and on each epoch's last batch, as the
    values for the loggers only and those shown on the progress bar too; ``None`` between.

    ``self.log`` costs tens of microseconds per key, so the values are logged only when Lightning will write
    (``log_every_n_steps``) or an epoch ends (so short runs get metrics too), and ``metrics="basic"`` keeps to a
    handful of keys; the window covers every step since the previous write.
    """
    trainer = getattr(module, "_trainer", None)
    if trainer is None or session.config.metrics == "off" or not lightning_writes_now(trainer):
        return None
    metrics = window_metrics(session)
    level = session.config.metrics
    if level == "basic":  # plus the gradient norm when asked for by name (`log_grad_norm=True`)
        metrics = {key: value for key, value in metrics.items() if key in BASIC_METRICS or key == GRAD_NORM}
    shown = PROGRESS_BAR_METRICS if session.config.metrics_on_progress_bar else ()
    on_bar = {key: metrics.pop(key) for key in shown if key in metrics}
    return metrics, on_bar


def lightning_writes_now(trainer: Any) -> bool:
    """Lightning writes to its loggers at the end of this step (``log_every_n_steps``), or an epoch ends."""
    every = trainer.log_every_n_steps
    return every > 0 and ((trainer.global_step + 1) % every == 0 or trainer.is_last_batch)


def batch_size_of(args: tuple[Any, ...]) -> int:
    """The samples in a training step's batch (for samples/s): the first dimension of its first tensor, as
    Lightning's own ``extract_batch_size`` takes it; 0 when the batch holds no tensor."""
    if args and type(args[0]) in (tuple, list) and args[0] and isinstance(args[0][0], Tensor):
        return int(args[0][0].shape[0]) if args[0][0].ndim else 1  # (x, y): the common case, without the walk
    pending: list[Any] = [args[0]] if args else []
    while pending:
        item = pending.pop(0)
        if isinstance(item, Tensor):
            return int(item.shape[0]) if item.ndim else 1
        if isinstance(item, dict):
            pending.extend(item.values())
        elif isinstance(item, (list, tuple)):
            pending.extend(item)
    return 0


def _update_kind(updater: LayerwiseUpdater) -> str:
    if updater.clip_norm is None:
        return "layer-wise updates" if updater.layerwise else "whole-model updates"
    if updater.layerwise:
        return "layer-wise updates, clipped by norm per bucket"
    return "whole-backward updates, clipped by norm"


def describe_session(session: FitSession, world_size: int) -> str:
    """One line with a fit session's engine configuration, logged at INFO when fit starts."""
    tuner, counts = session.threads.tuner, session.threads.settings
    if session.threads.plain_steps and not session.threads.warming_up:
        ranks = f" on each of {world_size} ranks, replicas exchanged in the background" if world_size > 1 else ""
        because = "max_in_flight=1" if session.synchronous_reason is None else "as warned"
        return f"PD-ASGD: Lightning's own synchronous step ({because}){ranks}; exact, no engine threads"
    tuning = f", autotuning {len(tuner.candidates)} candidates" if tuner is not None else ""
    backward_threads, max_in_flight, intra_op = counts.backward_threads, counts.max_in_flight, counts.intra_op_threads
    if session.threads.warming_up:  # say what the run trains with after it
        backward_threads, max_in_flight = session.threads.after_warmup
        intra_op = counts.intra_op_threads_for(backward_threads, max_in_flight, None)
        how = "Lightning's own step" if session.threads.plain_steps else "one loss in flight"
        settling = session.threads.settling
        extension = f", up to {settling.extra_left} more until the training loss has halved" if settling else ""
        tuning += f"; {how} for the first {session.threads.warmup_left} steps (synchronous warm-up{extension})"
    ranks = f" on each of {world_size} ranks" if world_size > 1 else ""
    if backward_threads < session.config.backward_threads and session.config.backward_threads_within_cores:
        ranks += f" (the default 1:{session.config.backward_threads}, fitted to {counts.saved_num_threads} CPU core(s))"
    return (
        f"PD-ASGD: 1 forward : {backward_threads} backward threads{ranks},"
        f" max_in_flight={max_in_flight}, {intra_op} intra-op thread(s) per engine thread,"
        f" {len(session.updater.buckets)} update buckets"
        f" ({_update_kind(session.updater)}){tuning}"
    )
