"""The strategy's settings, validated once, with errors that name the argument and what it accepts."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal, Union

import torch

from lightning_pdasgd.distributed.replica_exchange import REPLICA_MERGES
from lightning_pdasgd.engine import nonfinite
from lightning_pdasgd.engine.autotune import backward_threads_within_cores
from lightning_pdasgd.engine.compensation import DEFAULT_STALENESS_COMPENSATION, StalenessCompensation
from lightning_pdasgd.engine.compensation import resolve as resolve_compensation

ThreadCount = Union[int, Literal["auto"]]

DEFAULT_BACKWARD_THREADS = 2
BucketSize = Union[int, Literal["auto"]]
DEFAULT_BUCKET_NUMEL: BucketSize = "auto"  # 65,536 elements; a bucket per module for a smaller model
METRICS_LEVELS = ("off", "basic", "full")
GRADIENT_HOOK_POLICIES = ("synchronous", "skip")
# the first steps of a fit run one loss in flight: a fraction of the run, at most so many steps; "auto" (the default):
# at least the first fraction, and on to the second while the loss has not halved (``engine/warmup.py``)
DEFAULT_SYNCHRONOUS_WARMUP = "auto"
SYNCHRONOUS_WARMUP_MAX_STEPS = 500
AUTO_WARMUP_FRACTIONS = (0.1, 1 / 3)


def check_positive_int(name: str, value: object, allow_none: bool = False) -> None:
    if allow_none and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"PDASGDStrategy: `{name}` must be an integer >= 1, got {value!r}.")


def _check_thread_count(name: str, value: object) -> None:
    if value != "auto":
        check_positive_int(name, value)


@dataclass(frozen=True)
class PDASGDConfig:
    """What ``PDASGDStrategy.__init__`` was given, checked; see the strategy's docstring for each field."""

    forward_threads: int = 1
    backward_threads: int = DEFAULT_BACKWARD_THREADS
    max_in_flight: int | None = None  # None: as many as backward threads
    backward_threads_within_cores: bool = False  # the default count: fewer backward threads on a CPU with few cores
    autotune: bool = False  # a thread count was "auto"
    layerwise: bool = True
    lazy_reads: bool = True
    divergence_guard: bool = True
    wait_timeout: float = 600.0
    intra_op_threads: int | None = None
    log_grad_norm: bool = False
    exchange_interval: float = 0.0
    replica_merge: str = "mean"
    nonfinite: str = "error"
    checkpoint_on_preemption: bool = True
    autotune_steps: int = 6
    autotune_max_staleness: float = 4.0
    bucket_numel: BucketSize = DEFAULT_BUCKET_NUMEL
    metrics: str = "basic"
    metrics_on_progress_bar: bool = False
    gradient_hooks: str = "synchronous"
    staleness_compensation: Union[str, StalenessCompensation] = DEFAULT_STALENESS_COMPENSATION
    synchronous_warmup: Union[int, float, str] = DEFAULT_SYNCHRONOUS_WARMUP
    fault_tolerant: bool = False
    lighthouse: str | None = None
    replica: int | None = None
    max_replicas: int = 16
    ft_timeout: float = 5.0

    # the strategy's constructor arguments that are PD-ASGD settings (the rest are Lightning's)
    ARGUMENTS: ClassVar[tuple[str, ...]] = (
        "forward_threads", "backward_threads", "max_in_flight", "layerwise", "lazy_reads", "divergence_guard",
        "wait_timeout", "intra_op_threads", "log_grad_norm", "exchange_interval", "replica_merge", "nonfinite",
        "checkpoint_on_preemption", "autotune_steps", "autotune_max_staleness", "bucket_numel", "metrics",
        "metrics_on_progress_bar", "gradient_hooks", "staleness_compensation", "synchronous_warmup",
        "fault_tolerant", "lighthouse", "replica", "max_replicas", "ft_timeout",
    )
    _BOOLEANS: ClassVar[tuple[str, ...]] = ("lazy_reads", "divergence_guard", "fault_tolerant")
    _FLOATS: ClassVar[tuple[str, ...]] = ("wait_timeout", "exchange_interval", "autotune_max_staleness", "ft_timeout")

    @classmethod
    def from_arguments(
        cls,
        forward_threads: ThreadCount = 1,
        backward_threads: ThreadCount | None = None,
        max_in_flight: int | None = None,
        **settings: object,
    ) -> PDASGDConfig:
        """Validate the constructor's arguments; ``"auto"`` thread counts start from the defaults, and ``None``
        backward threads is the default count (``DEFAULT_BACKWARD_THREADS``, fewer on a CPU with few cores)."""
        for name in cls._BOOLEANS:
            if name in settings:
                settings[name] = bool(settings[name])
        for name in cls._FLOATS:
            if name in settings:
                settings[name] = float(settings[name])  # type: ignore[arg-type]
        _check_thread_count("forward_threads", forward_threads)
        autotune = "auto" in (forward_threads, backward_threads)
        within_cores = backward_threads is None
        backward_threads = DEFAULT_BACKWARD_THREADS if within_cores or backward_threads == "auto" else backward_threads
        _check_thread_count("backward_threads", backward_threads)
        check_positive_int("max_in_flight", max_in_flight, allow_none=True)
        if forward_threads not in (1, "auto"):
            raise ValueError(
                f"PDASGDStrategy: `forward_threads={forward_threads}` is not supported yet: Lightning's loop thread"
                " runs every forward. Use `forward_threads=1` and raise `backward_threads` for more concurrency."
            )
        config = cls(
            forward_threads=1,
            backward_threads=int(backward_threads),  # type: ignore[arg-type]
            max_in_flight=max_in_flight,
            backward_threads_within_cores=within_cores,
            autotune=autotune,
            **settings,  # type: ignore[arg-type]
        )
        config._validate()
        return config

    def _validate(self) -> None:
        check_positive_int("autotune_steps", self.autotune_steps)
        check_positive_int("intra_op_threads", self.intra_op_threads, allow_none=True)
        if not self.autotune_max_staleness >= 0:
            raise ValueError(
                f"PDASGDStrategy: `autotune_max_staleness` must be >= 0, got {self.autotune_max_staleness!r}."
            )
        if not self.wait_timeout > 0:
            raise ValueError(f"PDASGDStrategy: `wait_timeout` must be > 0 seconds, got {self.wait_timeout!r}.")
        nonfinite.validate(self.nonfinite)
        if not self.exchange_interval >= 0:
            raise ValueError(
                f"PDASGDStrategy: `exchange_interval` must be >= 0 seconds, got {self.exchange_interval!r}."
            )
        if self.replica_merge not in REPLICA_MERGES:
            raise ValueError(
                f"PDASGDStrategy: `replica_merge` must be one of {REPLICA_MERGES}, got {self.replica_merge!r}. Use"
                " 'mean' (the default: DDP's learning-rate semantics) or 'sum' (every batch a whole step, as on one"
                " device)."
            )
        resolve_compensation(self.staleness_compensation)  # a ValueError names the allowed values
        warmup = self.synchronous_warmup
        steps = isinstance(warmup, int) and not isinstance(warmup, bool) and warmup >= 0
        if not steps and not (isinstance(warmup, float) and 0.0 <= warmup < 1.0) and warmup != "auto":
            raise ValueError(
                f"PDASGDStrategy: `synchronous_warmup` must be 'auto', a number of steps (an integer >= 0) or a"
                f" fraction of the run in [0, 1), got {warmup!r}. Use 0 to train asynchronously from the first step."
            )
        if self.metrics not in METRICS_LEVELS:
            raise ValueError(f"PDASGDStrategy: `metrics` must be one of {METRICS_LEVELS}, got {self.metrics!r}.")
        if self.gradient_hooks not in GRADIENT_HOOK_POLICIES:
            raise ValueError(
                f"PDASGDStrategy: `gradient_hooks` must be one of {GRADIENT_HOOK_POLICIES},"
                f" got {self.gradient_hooks!r}."
            )
        check_positive_int("max_replicas", self.max_replicas)
        replica_ok = self.replica is None or (not isinstance(self.replica, bool) and isinstance(self.replica, int))
        if not replica_ok or (self.replica is not None and not 0 <= self.replica < self.max_replicas):
            raise ValueError(
                f"PDASGDStrategy: `replica={self.replica}` must be in 0..{self.max_replicas - 1} (`max_replicas`)."
            )
        if not self.ft_timeout > 0:
            raise ValueError(f"PDASGDStrategy: `ft_timeout` must be > 0 seconds, got {self.ft_timeout!r}.")
        numel = self.bucket_numel
        if numel != "auto" and (isinstance(numel, bool) or not isinstance(numel, int) or numel < 0):
            raise ValueError(f"PDASGDStrategy: `bucket_numel` must be an integer >= 0 or 'auto', got {numel!r}.")

    def warmup_steps(self, run_steps: float, done_steps: int, ranks: int = 1) -> tuple[int, int]:
        """How many of this rank's coming optimizer steps run one loss in flight, and how many more may while the
        loss has not halved (``"auto"`` only, and only in a fit that starts from step 0: a resumed run's loss no
        longer starts where the run did). A fraction is of a run of ``run_steps`` (``inf``: unknown) and at most
        ``SYNCHRONOUS_WARMUP_MAX_STEPS``, less the ``done_steps`` a resumed fit has already trained. Steps count as
        ``global_step`` does, over all ``ranks`` (each trains its share)."""

        def steps_of(warmup: Union[int, float]) -> int:
            if isinstance(warmup, float):
                cap = SYNCHRONOUS_WARMUP_MAX_STEPS
                return cap if run_steps == float("inf") else min(cap, math.ceil(warmup * run_steps))
            return int(warmup)

        if self.synchronous_warmup != "auto":
            fixed, longest = steps_of(self.synchronous_warmup), 0
        else:
            fixed, longest = (steps_of(fraction) for fraction in AUTO_WARMUP_FRACTIONS)
        extension = max(0, longest - fixed) if done_steps == 0 else 0
        return math.ceil(max(0, fixed - done_steps) / ranks), math.ceil(extension / ranks)

    def ineffective_settings(self) -> list[str]:
        """Warnings for settings that would silently do nothing."""
        warnings = []
        idle = self.max_in_flight is not None and self.backward_threads > self.max_in_flight
        # `max_in_flight=1` with the default thread count is the plain-equivalence mode: nothing to warn about
        if idle and not self.autotune and (self.max_in_flight != 1 or self.backward_threads > DEFAULT_BACKWARD_THREADS):
            warnings.append(
                f"PDASGDStrategy: `backward_threads={self.backward_threads}` with `max_in_flight={self.max_in_flight}`:"
                f" at most {self.max_in_flight} backward passes exist at once, so"
                f" {self.backward_threads - self.max_in_flight} backward thread(s) will always be idle. Raise"
                f" `max_in_flight` to at least {self.backward_threads} (or leave it unset) to use them."
            )
        return warnings

    def backward_threads_on(self, device: torch.device | None) -> int:
        """The backward threads a fit on ``device`` runs with: the configured count, or the default one fitted to the
        cores (``autotune.backward_threads_within_cores``); ``None``: the device is not known yet."""
        if device is None or not self.backward_threads_within_cores or self.autotune:
            return self.backward_threads
        return backward_threads_within_cores(self.backward_threads, device, torch.get_num_threads())

    @property
    def in_flight(self) -> int:
        """The bound on live graphs: ``max_in_flight``, or one per backward thread."""
        return self.max_in_flight if self.max_in_flight is not None else self.backward_threads
