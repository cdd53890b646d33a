"""What is compared: the strategy configurations, and the suites (which configurations, how long, how often).

A configuration is everything that differs between rows of a table; everything else (model, data, seed, batch
size per device, optimizer, epochs) is fixed per workload by the suite, so rows differ by the strategy alone.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional

STRAGGLER_FACTORS = (0.0, 0.5, 1.0, 2.0, 4.0)


@dataclass(frozen=True)
class Config:
    """One way of training: a Lightning strategy and its settings."""

    name: str
    strategy: str  # "auto" (plain Lightning), "ddp", or "pdasgd" (PDASGDStrategy)
    group: str  # which question the row answers: baseline, ratio, ablation, overhead, threads, multi, straggler
    description: str
    devices: int = 1
    backward_threads: int | str | None = 2  # "auto": the strategy's thread-ratio autotuner; None: its default
    max_in_flight: Optional[int] = None
    layerwise: bool = True
    intra_op_threads: Optional[int] = None  # None: torch's default (DDP: Lightning's cores // devices)
    straggler_factor: Optional[float] = None  # Straggler(rank=1, factor=...) on multi-device rows
    staleness_compensation: Optional[str] = None  # None: the strategy's default
    divergence_guard: bool = True
    replica_merge: Optional[str] = None  # None: the strategy's default ("mean")

    @property
    def skip_group(self) -> str:
        """Runs that a setup refusal applies to alike: a refusal seen once is not re-measured in that group."""
        return f"{self.strategy}-devices{self.devices}"

    @property
    def method(self) -> str:
        """The straggler sweep's method name: the configuration without its delay."""
        return self.name.split("-straggler-")[0]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Config":
        return cls(**data)


def _ratio(k: int) -> str:
    return f"1:{k}"


def build_configs(devices: int) -> dict[str, Config]:
    """Every configuration the suites can name, for ``devices`` devices in the multi-device rows."""
    n = devices
    rows: list[Config] = [
        Config("plain", "auto", "baseline", "plain Lightning, 1 device, automatic optimization"),
        Config("plain-t1", "auto", "threads", "plain Lightning with torch.set_num_threads(1)", intra_op_threads=1),
        Config(f"ddp-x{n}", "ddp", "baseline", f"Lightning DDP on {n} devices (gloo on CPU)", devices=n,
               straggler_factor=0.0),
    ]
    rows += [
        Config("pdasgd-default", "pdasgd", "ratio", "PD-ASGD's default threads: 1:2, or 1:1 with two losses in"
               " flight on a CPU with under 3 cores", backward_threads=None),
        Config(f"pdasgd-default-x{n}", "pdasgd", "multi", f"PD-ASGD's default threads on {n} devices",
               backward_threads=None, devices=n),
    ]
    for k in (1, 2, 3):
        rows.append(Config(f"pdasgd-{_ratio(k)}", "pdasgd", "ratio", f"PD-ASGD, 1 forward : {k} backward threads",
                           backward_threads=k))
        rows.append(Config(f"pdasgd-{_ratio(k)}-t1", "pdasgd", "threads",
                           f"PD-ASGD 1:{k} with intra_op_threads=1", backward_threads=k, intra_op_threads=1))
        rows.append(Config(f"pdasgd-{_ratio(k)}-x{n}", "pdasgd", "multi", f"PD-ASGD 1:{k} on {n} devices",
                           backward_threads=k, devices=n, straggler_factor=0.0 if k == 2 else None))
    rows += [
        Config("dasgd-1:2", "pdasgd", "ablation", "D-ASGD ablation: layerwise=False (whole-model update per backward)",
               backward_threads=2, layerwise=False),
        Config("pdasgd-auto", "pdasgd", "ratio",
               "PD-ASGD with backward_threads='auto' (times candidates, may pick the plain synchronous step)",
               backward_threads="auto"),
        Config("pdasgd-mif1", "pdasgd", "overhead",
               "PD-ASGD engine with max_in_flight=1 (sequential; engine overhead vs plain)",
               backward_threads=1, max_in_flight=1),
        Config("pdasgd-default-raw", "pdasgd", "compensation",
               "PD-ASGD's default threads with staleness_compensation='none' and divergence_guard=False (what the"
               " default's compensation and guard cost)", backward_threads=None, staleness_compensation="none",
               divergence_guard=False),
        Config("pdasgd-1:2-raw", "pdasgd", "compensation",
               "PD-ASGD 1:2 with staleness_compensation='none' and divergence_guard=False (what the default's"
               " compensation and guard cost)", staleness_compensation="none", divergence_guard=False),
        Config(f"pdasgd-mif1-x{n}", "pdasgd", "multi",
               f"PD-ASGD max_in_flight=1 on {n} devices: Lightning's own step per rank, the exchange in the background",
               backward_threads=1, max_in_flight=1, devices=n),
        Config(f"pdasgd-1:2-x{n}-sum", "pdasgd", "multi",
               f"PD-ASGD 1:2 on {n} devices with replica_merge='sum' (every batch a whole step on every replica)",
               backward_threads=2, devices=n, replica_merge="sum"),
        Config(f"pdasgd-mif1-x{n}-sum", "pdasgd", "multi",
               f"PD-ASGD max_in_flight=1 on {n} devices with replica_merge='sum'",
               backward_threads=1, max_in_flight=1, devices=n, replica_merge="sum"),
    ]
    for factor in STRAGGLER_FACTORS[1:]:
        for base in (f"ddp-x{n}", f"pdasgd-1:2-x{n}"):
            template = next(row for row in rows if row.name == base)
            rows.append(Config(
                f"{base}-straggler-{factor:g}", template.strategy, "straggler",
                f"{template.description}; rank 1 sleeps {factor:g}x its step time per step",
                devices=n, backward_threads=template.backward_threads, straggler_factor=factor,
            ))
    return {row.name: row for row in rows}


@dataclass(frozen=True)
class WorkloadPlan:
    """Which configurations a suite runs on one workload, for how long and how often."""

    workload: str
    epochs: int
    configs: tuple[str, ...]
    repeats: dict[str, int] = field(default_factory=dict)  # per configuration; default: the suite's repeats
    train_limit: Optional[int] = None
    val_limit: Optional[int] = None
    # fraction of an epoch between validations; PD-ASGD on several devices validates at epoch ends only, and
    # every row uses the same schedule
    val_check_interval: float = 1.0
    target_accuracy: Optional[float] = None  # None: the workload's own target

    def repeats_of(self, config: str, default: int) -> int:
        return self.repeats.get(config, default)


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    plans: tuple[WorkloadPlan, ...]
    repeats: int
    straggler_workload: Optional[str]  # the workload whose plan holds the straggler rows
    peak_repeats: int = 5
    run_timeout_s: float = 300.0


def _straggler_rows(n: int, factors: tuple[float, ...]) -> tuple[str, ...]:
    return tuple(f"{base}-straggler-{f:g}" for f in factors for base in (f"ddp-x{n}", f"pdasgd-1:2-x{n}"))


def build_suite(name: str, devices: int, accelerator: str = "cpu") -> Suite:
    """The named suite for ``devices`` devices in the multi-device rows. Budgets are for a 2-core CPU."""
    n = devices
    if name == "smoke":
        plan = WorkloadPlan("digits-mlp", 2, ("plain", "pdasgd-1:2", f"ddp-x{n}", f"pdasgd-1:2-x{n}"))
        return Suite("smoke", "every code path once (1 repeat, 2 short epochs): the default test suite's check",
                     (plan,), repeats=1, straggler_workload="digits-mlp", peak_repeats=2, run_timeout_s=180.0)
    if name == "speed":  # issue #10's goals: >= 5 ms workloads and the digits ones, medians of 3, interleaved
        rows = ("plain", "pdasgd-default", "pdasgd-1:2", "pdasgd-mif1", "pdasgd-auto", f"ddp-x{n}",
                f"pdasgd-default-x{n}", f"pdasgd-1:2-x{n}")
        plans = tuple(WorkloadPlan(w, 3, rows) for w in ("wide-mlp", "cnn32", "digits-mlp", "digits-cnn"))
        return Suite("speed", "samples/s of plain, PD-ASGD's default threads and 1:2, max_in_flight=1 and auto, DDP"
                     " and PD-ASGD on 2 devices, on two >= 5 ms workloads and the digits ones", plans, repeats=3,
                     straggler_workload=None, peak_repeats=3, run_timeout_s=300.0)
    if name == "compensation":  # issue #20: the default's compensation and guard against neither, on speed's workloads
        rows = ("plain", "pdasgd-default", "pdasgd-default-raw", "pdasgd-1:2", "pdasgd-1:2-raw")
        plans = tuple(WorkloadPlan(w, 3, rows) for w in ("wide-mlp", "cnn32", "digits-mlp", "digits-cnn"))
        return Suite("compensation", "samples/s of PD-ASGD (default threads and 1:2) with the default compensation"
                     " and guard against staleness_compensation='none' with the guard off, on the speed suite's"
                     " workloads", plans,
                     repeats=3, straggler_workload=None, peak_repeats=3, run_timeout_s=300.0)
    if name == "replicas":  # issue #21: two ranks against DDP, and how the exchange merges the replicas' updates
        rows = (f"ddp-x{n}", f"pdasgd-default-x{n}", f"pdasgd-1:2-x{n}", f"pdasgd-mif1-x{n}", f"pdasgd-1:2-x{n}-sum",
                f"pdasgd-mif1-x{n}-sum")
        plans = (WorkloadPlan("digits-mlp", 5, rows), WorkloadPlan("digits-cnn", 4, rows))
        return Suite("replicas", f"DDP and PD-ASGD on {n} devices (1:2 and max_in_flight=1), with replica_merge 'mean'"
                     " (the default) and 'sum', on the digits MLP and CNN", plans, repeats=3,
                     straggler_workload=None, peak_repeats=3, run_timeout_s=300.0)
    if name == "quick":
        essential = ("plain", "pdasgd-1:2", "pdasgd-auto")
        extra = (f"ddp-x{n}", f"pdasgd-1:2-x{n}") + _straggler_rows(n, (1.0,))
        plan = WorkloadPlan("digits-mlp", 3, essential + extra, repeats={c: 1 for c in extra})
        return Suite("quick", "digits MLP, 3 epochs; plain, PD-ASGD 1:2 and auto x3; DDP, multi-device PD-ASGD and one"
                     " straggler delay x1", (plan,), repeats=3, straggler_workload="digits-mlp", peak_repeats=3,
                     run_timeout_s=180.0)
    if name == "full":
        ratios = ("pdasgd-1:1", "pdasgd-1:2", "pdasgd-1:3")
        mlp = WorkloadPlan(
            "digits-mlp", 5,
            ("plain", "plain-t1", f"ddp-x{n}") + ratios + tuple(f"{r}-t1" for r in ratios)
            + ("dasgd-1:2", "pdasgd-mif1", "pdasgd-auto") + tuple(f"{r}-x{n}" for r in ratios) + (f"pdasgd-mif1-x{n}",)
            + _straggler_rows(n, STRAGGLER_FACTORS[1:]),
        )
        cnn = WorkloadPlan("digits-cnn", 4, ("plain", f"ddp-x{n}") + ratios
                           + ("dasgd-1:2", "pdasgd-auto", f"pdasgd-1:2-x{n}"))
        heavy = ("plain", "pdasgd-1:2", "pdasgd-mif1", "pdasgd-auto", f"ddp-x{n}", f"pdasgd-1:2-x{n}")
        wide = WorkloadPlan("wide-mlp", 3, heavy)
        cnn32 = WorkloadPlan("cnn32", 3, heavy)
        resnet_rows = ("plain", f"ddp-x{n}", "pdasgd-1:2", f"pdasgd-1:2-x{n}")
        if accelerator == "gpu":
            resnet = WorkloadPlan("cifar10-resnet18", 8, resnet_rows + ("pdasgd-1:1", "pdasgd-1:3", "dasgd-1:2"),
                                  target_accuracy=0.75)
        else:  # ~70 samples/s on 2 cores: a 1,024-image prefix, ~11 extra minutes when the data is given
            resnet = WorkloadPlan("cifar10-resnet18", 2, resnet_rows, train_limit=1024, val_limit=1000,
                                  target_accuracy=0.20)
        return Suite("full", "digits MLP (every row and the straggler sweep), digits CNN, ResNet-18 if CIFAR-10 is"
                     " present", (mlp, cnn, wide, cnn32, resnet), repeats=3, straggler_workload="digits-mlp",
                     peak_repeats=10, run_timeout_s=600.0)
    raise ValueError(f"unknown suite {name!r}; choose one of {SUITES}")


SUITES = ("smoke", "quick", "speed", "compensation", "replicas", "full")
