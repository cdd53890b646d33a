"""Convergence under asynchrony: final accuracy and time to target of PD-ASGD with each staleness compensation,
beside plain Lightning (1 device) or DDP (2 devices) with the same hyperparameters, over a grid of settings.

    python -m benchmarks.convergence --grid quick --out /tmp/conv         # a few minutes
    python -m benchmarks.convergence --grid full --out benchmarks/results  # the published convergence.md/.png

Single-device runs share one process (they are short; fresh processes would cost more than the runs); every
multi-device run is a fresh process launched by Lightning from this script (``--worker SPEC``). Results are
appended to ``OUT/convergence.jsonl`` as they finish, so an interrupted grid resumes where it stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn
from torch.utils.data import TensorDataset

from benchmarks import models
from benchmarks.workloads import WORKLOADS, Workload


def synthetic_datasets(seed: int = 0, train: int = 4096, val: int = 1024) -> tuple[TensorDataset, TensorDataset]:
    """A learnable 784-feature, 10-class problem: 40 Gaussian clusters in a 32-d latent space, mapped to 784-d by a
    fixed random linear map plus a ReLU, labels = cluster mod 10 (not linearly separable). Fixed data seed 0."""
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(40, 32, generator=g) * 1.6
    mix = torch.randn(32, 784, generator=g) / math.sqrt(32)
    total = train + val
    cluster = torch.randint(0, 40, (total,), generator=g)
    latent = centers[cluster] + torch.randn(total, 32, generator=g)
    x = torch.relu(latent @ mix) + 0.1 * torch.randn(total, 784, generator=g)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    y = cluster % 10
    order = torch.randperm(total, generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    return TensorDataset(x[:train], y[:train]), TensorDataset(x[train:], y[train:])


def synthetic_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))


SYNTHETIC = Workload(
    name="synth-mlp",
    description="MLP 784-1024-1024-10 on synthetic clusters (4,096 train / 1,024 val), batch 128",
    build_model=synthetic_mlp,
    target_accuracy=0.90,
    batch_size=128,
)


def small_digits_mlp() -> nn.Module:
    """The tests' digits MLP (64 hidden units, BatchNorm after the first layer only): the model of issue #11,
    far more sensitive to staleness than the benchmark's wider, fully normalised ``digits-mlp``."""
    return nn.Sequential(nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                         nn.Linear(64, 10))


class SharedLayerMLP(nn.Module):
    """One hidden layer applied three times per forward (shared weights, residual), as recurrent or ALBERT-style
    blocks are: its parameters get three gradient contributions per step, which puts SGD at lr 0.05 with momentum
    0.9 near the edge where one step of delay destabilizes it (a held-out model, not tuned for this project)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.mid, self.out = nn.Linear(64, 128), nn.Linear(128, 128), nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = torch.relu(self.inp(x))
        for _ in range(3):
            hidden = torch.relu(self.mid(hidden)) + hidden
        return self.out(hidden)


SMALL = Workload(name="digits-mlp-small", description="MLP 64-64-64-10 (one BatchNorm) on scikit-learn digits",
                 build_model=small_digits_mlp, target_accuracy=0.95, weight_decay=0.0)
RESNET18 = Workload(name="resnet18-digits", description="torchvision ResNet-18 (BatchNorm), digits at 16x16, batch 64",
                    build_model=models.digits_resnet18, target_accuracy=0.9, batch_size=64, weight_decay=1e-3)
VGG_BN = Workload(name="vgg-bn-digits", description="VGG-style CNN, BatchNorm after each of 8 convs, digits 16x16",
                  build_model=models.digits_vgg_bn, target_accuracy=0.9, batch_size=64, weight_decay=5e-4)
SHARED = Workload(name="digits-mlp-shared", description="MLP 64-128-10 whose 128x128 layer is applied 3 times"
                  " per forward (shared weights), digits, batch 64", build_model=SharedLayerMLP,
                  target_accuracy=0.9, batch_size=64, weight_decay=0.0)
LSTM = Workload(name="lstm-order", description="the LSTM example (examples/sequence_classifier.py) on its synthetic"
                " marker-order task, batch 64", build_model=nn.Identity, target_accuracy=0.95, batch_size=64)
# torchvision models nobody tuned for this project (the "zoo" grid), each at an ordinary recipe of its family
ZOO = {
    f"tv-{name}": Workload(name=f"tv-{name}", description=f"torchvision {name} from scratch, digits at 3x32x32",
                           build_model=functools.partial(models.digits_torchvision, name), target_accuracy=0.9,
                           batch_size=64, weight_decay=5e-4)
    for name in ("mobilenet_v2", "shufflenet_v2_x0_5", "googlenet", "efficientnet_b0")
}
CONVERGENCE_WORKLOADS = {"digits-mlp-small": SMALL, "digits-mlp": WORKLOADS["digits-mlp"],
                         "digits-cnn": WORKLOADS["digits-cnn"], "synth-mlp": SYNTHETIC,
                         "resnet18-digits": RESNET18, "vgg-bn-digits": VGG_BN, "cnn32": WORKLOADS["cnn32"],
                         "lstm-order": LSTM, "digits-mlp-shared": SHARED, **ZOO}


def datasets(workload: Workload, seed: int) -> tuple[TensorDataset, TensorDataset]:
    if workload.name == "synth-mlp":
        return synthetic_datasets(seed)
    if workload.synthetic is not None:
        return workload.datasets(seed)
    return models.digits_datasets(seed)


def module_and_data(spec: dict[str, Any], workload: Workload) -> tuple[Any, Any]:
    """The LightningModule and DataModule of one cell: the LSTM example's own classes, else the benchmarks'
    classifier over the workload's model with the optimizer the cell names (SGD by default)."""
    from benchmarks.lit import Classifier, Data

    if workload.name == "lstm-order":
        from examples.sequence_classifier import SequenceClassifier, SequenceDataModule

        return SequenceClassifier(lr=spec["lr"]), SequenceDataModule(batch_size=workload.batch_size, seed=spec["seed"])
    train, val = datasets(workload, spec["seed"])
    model = Classifier(workload)
    optimizers = {
        "adam": lambda: torch.optim.Adam(model.parameters(), lr=spec["lr"]),
        "adamw": lambda: torch.optim.AdamW(model.parameters(), lr=spec["lr"], weight_decay=0.01),
        "nesterov": lambda: torch.optim.SGD(model.parameters(), lr=spec["lr"], momentum=spec["momentum"],
                                            nesterov=True, weight_decay=workload.weight_decay),
    }
    if spec.get("optimizer") in optimizers:
        model.configure_optimizers = optimizers[spec["optimizer"]]  # type: ignore[method-assign]
    return model, Data(train, val, workload.batch_size, spec["seed"])


# ------------------------------------------------------------------------------------------------ one run
def run_one(spec: dict[str, Any]) -> dict[str, Any]:
    """Train one cell (in this process; with ``devices > 1`` Lightning launches the other ranks)."""
    import lightning.pytorch as pl

    from benchmarks.timing import RunClock
    from lightning_pdasgd import NonFiniteError, PDASGDStrategy

    workload = dataclasses.replace(CONVERGENCE_WORKLOADS[spec["workload"]], lr=spec["lr"],
                                   momentum=spec["momentum"])
    pl.seed_everything(spec["seed"], verbose=False)
    model, data = module_and_data(spec, workload)
    clock = RunClock()
    kind = spec["kind"]  # plain | ddp | pdasgd | dasgd
    if kind in ("pdasgd", "dasgd"):
        # 1:2 cells run the default thread count (1:2; one backward thread with two losses in flight on a CPU with
        # under 3 cores); the result's `backward_threads` says which ran
        threads_asked = spec.get("threads", 2)
        strategy: Any = PDASGDStrategy(backward_threads=None if threads_asked == 2 else threads_asked,
                                       layerwise=kind == "pdasgd",
                                       staleness_compensation=spec["compensation"],
                                       lazy_reads=spec.get("lazy_reads", True),
                                       divergence_guard=spec.get("guard", True),
                                       **spec.get("strategy_kwargs", {}))
    else:
        strategy = "ddp" if kind == "ddp" else "auto"
    if spec.get("pretrain_epochs"):  # a fine-tune: plain Lightning trains the model first, at `pretrain_lr`
        model.workload = dataclasses.replace(workload, lr=spec["pretrain_lr"])
        pl.Trainer(accelerator="cpu", max_epochs=spec["pretrain_epochs"], num_sanity_val_steps=0, logger=False,
                   enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                   limit_val_batches=0).fit(model, datamodule=data)
        model.workload = workload  # the fine-tune's own optimizer (fresh state) and learning rate
    trainer = pl.Trainer(accelerator="cpu", devices=spec.get("devices", 1), strategy=strategy,
                         max_epochs=spec["epochs"], callbacks=[clock], num_sanity_val_steps=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         gradient_clip_val=spec.get("gradient_clip_val"))
    threads = torch.get_num_threads()
    started = time.perf_counter()
    diverged = False
    try:
        trainer.fit(model, datamodule=data)
    except NonFiniteError:  # PD-ASGD stops at a NaN loss; plain Lightning trains on and validates at chance
        diverged = True
    torch.set_num_threads(threads)
    stats = getattr(trainer.strategy, "stats", None)
    target = workload.target_accuracy
    reached = next((v["wall_s"] for v in clock.validations if v["accuracy"] >= target), None)
    return {
        **spec,
        "diverged": diverged,
        # a NaN loss is counted as chance accuracy (10 classes), as a diverged plain run validates
        "final_accuracy": 0.1 if diverged or not clock.validations else clock.validations[-1]["accuracy"],
        "accuracies": [v["accuracy"] for v in clock.validations],
        "validation_wall_s": [v["wall_s"] for v in clock.validations],
        "fit_s": time.perf_counter() - started,
        "train_s": sum(e["train_s"] for e in clock.epochs),
        "target": target,
        "time_to_target_s": reached,
        "staleness_mean": stats.mean_staleness if stats is not None else None,
        "guard_trips": stats.guard_trips if stats is not None else None,
        "backward_threads": getattr(trainer.strategy, "backward_threads", None),
    }


def _worker(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    result = run_one(spec)
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:
        Path(spec["out"]).write_text(json.dumps(result))


def _run_subprocess(spec: dict[str, Any]) -> Optional[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as folder:
        spec = {**spec, "out": str(Path(folder) / "result.json")}
        path = Path(folder) / "spec.json"
        path.write_text(json.dumps(spec))
        proc = subprocess.run([sys.executable, "-m", "benchmarks.convergence", "--worker", str(path)],
                              capture_output=True, text=True, timeout=900)
        out = Path(spec["out"])
        if not out.exists():
            print(proc.stderr[-3000:], file=sys.stderr)
            return None
        result = json.loads(out.read_text())
        result.pop("out", None)
        return result


# ------------------------------------------------------------------------------------------------ grids
def _cells(grid: str) -> list[dict[str, Any]]:
    """Every run of a grid; a pdasgd cell per compensation, its plain/DDP baseline beside it."""
    cells: list[dict[str, Any]] = []
    seeds = (0, 1, 2)

    def add(workload: str, epochs: int, lr: float, momentum: float, comps: tuple[str, ...],
            kinds: tuple[tuple[str, int, int], ...], optimizer: str = "sgd", seeds_: tuple[int, ...] = seeds) -> None:
        for seed in seeds_:
            base = dict(workload=workload, epochs=epochs, lr=lr, momentum=momentum, seed=seed, optimizer=optimizer)
            for kind, devices, threads in kinds:
                if kind in ("plain", "ddp"):
                    cells.append({**base, "kind": kind, "devices": devices, "threads": 0, "compensation": "-"})
                else:
                    for comp in comps:
                        cells.append({**base, "kind": kind, "devices": devices, "threads": threads,
                                      "compensation": comp})

    default = "predict+momentum"  # the default these grids were published with
    methods = ("none", "predict", "momentum", "predict+momentum", "lr", "dc")  # predict+momentum-k1: see report
    single = (("plain", 1, 0), ("pdasgd", 1, 2))
    if grid == "deep":  # issues #19/#20: deep BatchNorm CNNs at plain's hyperparameters, and per-step progress
        deep = ("none", default)
        for lr in (0.05, 0.1):
            add("resnet18-digits", 2, lr, 0.9, deep, single, optimizer="nesterov")
        for optimizer in ("sgd", "nesterov"):
            add("vgg-bn-digits", 2, 0.05, 0.9, deep, single, optimizer=optimizer)
        add("digits-cnn", 3, 0.1, 0.9, deep, single)
        for lr, momentum in ((0.05, 0.5), (0.05, 0.9), (0.1, 0.0)):
            add("digits-mlp-small", 3, lr, momentum, (*deep, "predict"), single)
        add("digits-mlp-small", 3, 0.01, 0.0, deep, single, optimizer="adam")
        at_start = [{**cell, "lazy_reads": False} for cell in cells
                    if cell["kind"] == "pdasgd" and cell["compensation"] == default and cell["epochs"] == 2]
        return cells + at_start
    if grid == "deep-guard":  # the rows where the compensation alone fell short, with the guard on (the default)
        candidates = ("none", "predict", default)
        add("resnet18-digits", 2, 0.05, 0.9, candidates, single, optimizer="nesterov")
        add("vgg-bn-digits", 2, 0.05, 0.9, candidates, single)
        add("digits-cnn", 3, 0.1, 0.9, candidates, single)
        for momentum in (0.5, 0.9):
            add("digits-mlp-small", 3, 0.05, momentum, candidates, single)
        add("digits-mlp-small", 3, 0.1, 0.0, candidates, single)
        add("digits-mlp-small", 3, 0.01, 0.0, candidates, single, optimizer="adam")
        return [{**cell, "guard": True} if cell["kind"] == "pdasgd" else cell for cell in cells]
    from lightning_pdasgd.engine.compensation import DEFAULT_STALENESS_COMPENSATION

    pair = (("plain", 1, 0), ("pdasgd", 1, 2))
    if grid in ("paired", "warmup", "zoo", "shared", "finetune", "clipping"):
        default = DEFAULT_STALENESS_COMPENSATION
    if grid == "shared":  # a held-out model near the asynchronous stability edge: the guard's relapse rule
        add("digits-mlp-shared", 4, 0.05, 0.9, (default,), pair, seeds_=tuple(range(8)))
        return cells + [{**cell, "guard": False, "label": "guard off"} for cell in cells if cell["kind"] == "pdasgd"]
    if grid == "zoo":  # models nobody tuned for: SGD momentum 0.9 for the CNN families, AdamW for EfficientNet;
        # 8 epochs: after 4, plain's own seeds still disagree by 10-60 points on these models
        for name in ("shufflenet_v2_x0_5", "mobilenet_v2", "googlenet"):
            add(f"tv-{name}", 8, 0.05, 0.9, (default,), pair, seeds_=(0, 1, 2, 3))
        add("tv-efficientnet_b0", 6, 1e-3, 0.0, (default,), pair, optimizer="adamw", seeds_=(0, 1, 2))
        return cells
    if grid == "paired":  # issue #20's goals: the default against plain on 5 paired seeds, read at every epoch's end
        five = (0, 1, 2, 3, 4)
        for lr in (0.05, 0.1):  # 4 epochs on the deep CNNs: plain's seeds still disagree by 15 points after 2
            add("resnet18-digits", 4, lr, 0.9, (default,), pair, optimizer="nesterov", seeds_=five)
        add("resnet18-digits", 4, 0.05, 0.9, (default,), pair, seeds_=five)  # heavy-ball: the delay-sensitive form
        for optimizer in ("sgd", "nesterov"):
            add("vgg-bn-digits", 4, 0.05, 0.9, (default,), pair, optimizer=optimizer, seeds_=five)
        add("digits-cnn", 3, 0.1, 0.9, (default,), pair, seeds_=five)
        add("cnn32", 3, 0.02, 0.9, (default,), pair, seeds_=five)
        for lr, momentum in ((0.05, 0.5), (0.05, 0.9), (0.1, 0.0)):
            add("digits-mlp-small", 3, lr, momentum, (default,), pair, seeds_=five)
        for optimizer in ("adam", "adamw"):
            add("digits-mlp-small", 3, 0.01, 0.0, (default,), pair, optimizer=optimizer, seeds_=five)
        add("lstm-order", 3, 0.01, 0.0, (default,), pair, optimizer="adam", seeds_=five)
        return cells
    if grid == "finetune":  # the guard on a fit that starts from trained weights: 10 plain epochs at lr 0.1 first
        for lr in (0.01, 0.1):
            add("digits-mlp-small", 4, lr, 0.9, (default,), pair, seeds_=tuple(range(6)))
            add("digits-cnn", 3, lr, 0.9, (default,), pair, seeds_=tuple(range(6)))
        return [{**cell, "pretrain_epochs": 10, "pretrain_lr": 0.1} for cell in cells]
    if grid == "clipping":  # clipping by norm under asynchrony: per bucket (now) against held to the backward's end
        add("digits-cnn", 3, 0.1, 0.9, (default,), pair, seeds_=(0, 1, 2, 3, 4))
        add("digits-cnn", 3, 0.3, 0.9, (default,), pair, seeds_=(0, 1, 2, 3, 4))
        add("resnet18-digits", 4, 0.05, 0.9, (default,), pair, seeds_=(0, 1, 2))
        add("lstm-order", 3, 0.01, 0.0, (default,), pair, optimizer="adam", seeds_=(0, 1, 2))
        held = [{**cell, "kind": "dasgd", "label": "held to the backward's end"} for cell in cells
                if cell["kind"] == "pdasgd"]  # `layerwise=False`: what clipping by norm did in earlier releases
        return [{**cell, "gradient_clip_val": 1.0} for cell in cells + held]
    if grid == "warmup":  # issue #20: the synchronous warm-up (the default) against none, 8 paired seeds
        eight = tuple(range(8))
        add("vgg-bn-digits", 4, 0.05, 0.9, (default,), pair, seeds_=eight)
        add("digits-cnn", 3, 0.1, 0.9, (default,), pair, seeds_=eight)
        add("cnn32", 3, 0.02, 0.9, (default,), pair, seeds_=eight)
        without = [{**cell, "strategy_kwargs": {"synchronous_warmup": 0}, "label": "no warm-up"}
                   for cell in cells if cell["kind"] == "pdasgd"]
        return cells + without
    if grid == "guard":  # issue #20: compensation off, where that diverges: the guard on against the guard off
        add("digits-cnn", 3, 0.1, 0.9, ("none",), single)
        add("digits-mlp-small", 3, 0.2, 0.9, ("none",), single)
        add("resnet18-digits", 2, 0.05, 0.9, ("none",), single, optimizer="nesterov")
        add("vgg-bn-digits", 2, 0.05, 0.9, ("none",), single)
        raw = [cell for cell in cells if cell["kind"] == "pdasgd"]
        at_start = [{**cell, "lazy_reads": False} for cell in raw if cell["workload"] == "resnet18-digits"]
        cells += at_start
        return cells + [{**cell, "guard": False} for cell in raw + at_start]
    if grid == "quick":
        for lr in (0.1, 0.2, 0.4):
            add("digits-mlp-small", 3, lr, 0.9, methods, single, seeds_=(0,))
        return cells
    # full: the model, every method over the lr grid; then the default vs none elsewhere
    for lr in (0.05, 0.1, 0.2, 0.4):
        add("digits-mlp-small", 3, lr, 0.9, methods, single)
    for momentum in (0.0, 0.5):
        add("digits-mlp-small", 3, 0.2, momentum, ("none", default), single)
    add("digits-mlp-small", 3, 0.01, 0.0, ("none", default), single, optimizer="adam")
    add("digits-mlp-small", 3, 0.2, 0.9, ("none", default), (("pdasgd", 1, 3), ("dasgd", 1, 2)))
    for lr in (0.1, 0.2, 0.4):
        add("digits-mlp", 3, lr, 0.9, ("none", default), single)
    for lr in (0.05, 0.1, 0.2):
        add("digits-cnn", 3, lr, 0.9, ("none", default), single)
    for lr in (0.05, 0.1):
        add("synth-mlp", 2, lr, 0.9, ("none", default), single)
    return cells


def _selected(cells: list[dict[str, Any]], seeds: Optional[int], workloads: Optional[str]) -> list[dict[str, Any]]:
    """``--workloads``: only those rows; ``--seeds N``: each row on seeds 0..N-1 (a noisy row measured on more
    seeds than the grid's own, plain and PD-ASGD still paired)."""
    if workloads:
        names = set(workloads.split(","))
        unknown = names - {cell["workload"] for cell in cells}
        if unknown:
            raise SystemExit(f"--workloads: no row of this grid trains {sorted(unknown)}")
        cells = [cell for cell in cells if cell["workload"] in names]
    if seeds is None:
        return cells
    rows: dict[str, dict[str, Any]] = {}
    for cell in cells:
        rows.setdefault(json.dumps({**cell, "seed": None}, sort_keys=True), cell)
    return [{**cell, "seed": seed} for seed in range(seeds) for cell in rows.values()]


def _multi_cells() -> list[dict[str, Any]]:
    """Two ranks: DDP and PD-ASGD x2 (default vs none) on the issue's model, 4 epochs."""
    cells = []
    for lr, optimizer in ((0.02, "nesterov"), (0.1, "sgd")):
        for seed in (0, 1, 2):
            base = dict(workload="digits-mlp-small", epochs=4, lr=lr, momentum=0.9, seed=seed, optimizer=optimizer,
                        devices=2)
            cells.append({**base, "kind": "ddp", "threads": 0, "compensation": "-"})
            for comp in ("none", "predict+momentum"):
                cells.append({**base, "kind": "pdasgd", "threads": 2, "compensation": comp})
    return cells


def _key(cell: dict[str, Any]) -> str:
    return json.dumps({k: cell[k] for k in sorted(cell) if k in (
        "workload", "epochs", "lr", "momentum", "seed", "optimizer", "kind", "devices", "threads", "compensation",
        "lazy_reads", "guard", "label", "strategy_kwargs", "pretrain_epochs", "pretrain_lr", "gradient_clip_val")},
        sort_keys=True)


def run_grid(cells: list[dict[str, Any]], out: Path) -> list[dict[str, Any]]:
    path = out / "convergence.jsonl"
    done: dict[str, dict[str, Any]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            row = json.loads(line)
            done[_key(row)] = row
    results = []
    for index, cell in enumerate(cells):
        key = _key(cell)
        if key not in done:
            row = run_one(cell) if cell["devices"] == 1 else _run_subprocess(cell)
            if row is None:
                continue
            with path.open("a") as handle:
                handle.write(json.dumps(row) + "\n")
            done[key] = row
            print(f"[{index + 1}/{len(cells)}] {cell['workload']} {cell['kind']}x{cell['devices']} "
                  f"1:{cell['threads']} lr={cell['lr']} m={cell['momentum']} {cell['compensation']} "
                  f"seed={cell['seed']}: acc={row['final_accuracy']:.3f} stal={row['staleness_mean']} "
                  f"fit={row['fit_s']:.1f}s", flush=True)
        results.append(done[key])
    return results


# ------------------------------------------------------------------------------------------------ report
def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _fmt_tt(values: list[Optional[float]]) -> str:
    """Median time to target over seeds; ``n/k`` when only n of k seeds reached it."""
    reached = sorted(v for v in values if v is not None)
    if not reached:
        return "never"
    median = reached[len(reached) // 2]
    return f"{median:.1f}s" + ("" if len(reached) == len(values) else f" ({len(reached)}/{len(values)})")


def summarize(rows: list[dict[str, Any]]) -> dict[tuple, dict[str, Any]]:
    """Mean final accuracy, seed range, time to target and staleness per (setting, configuration, method)."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        setting = (row["workload"], row["optimizer"], row["lr"], row["momentum"], row["devices"])
        method = (row["compensation"] + (" (reads at start)" if row.get("lazy_reads") is False else "")
                  + (" (guard off)" if row.get("guard") is False else ""))
        groups[(setting, row["kind"], row["threads"], method)].append(row)
    return {
        key: {
            "acc": _mean([r["final_accuracy"] for r in members]),
            "min": min(r["final_accuracy"] for r in members),
            "max": max(r["final_accuracy"] for r in members),
            "tt": _fmt_tt([r["time_to_target_s"] for r in members]),
            "tt_values": [r["time_to_target_s"] for r in members],
            "fit_s": _mean([r["fit_s"] for r in members]),
            "staleness": _mean([r["staleness_mean"] for r in members if r["staleness_mean"] is not None]),
            "seeds": len(members),
            "target": members[0]["target"],
            "epochs": members[0]["epochs"],
        }
        for key, members in groups.items()
    }


def _config_name(kind: str, threads: int, devices: int) -> str:
    if kind == "plain":
        return "plain"
    if kind == "ddp":
        return f"DDP x{devices}"
    name = "PD-ASGD" if kind == "pdasgd" else "D-ASGD (layerwise=False)"
    return f"{name} 1:{threads}" + (f" x{devices}" if devices > 1 else "")


FINDINGS = """## Findings (read with the tables below)

- Default `predict+momentum` vs plain, small digits MLP (issue #11's model), SGD momentum 0.9, 1 device, mean of 3
  seeds: lr 0.05 0.969 vs 0.959, lr 0.1 0.967 vs 0.969, lr 0.2 0.963 vs 0.947, lr 0.4 0.680 vs 0.762 (plain is
  itself unstable there, seeds 0.28-0.84; uncompensated 0.10). `predict+momentum-k2` (`momentum_strength=2`)
  reached 0.936 at lr 0.4 but cost the CNN 12 points at lr 0.05 (0.831 vs 0.949), so strength 1 is the default.
- Digits CNN: lr 0.05 0.949 vs 0.949; lr 0.1 0.900 vs 0.958 (uncompensated 0.480): the goal is missed there;
  lr 0.2: plain itself only 0.767, PD-ASGD 0.285 (0.224 uncompensated). Probes at lr 0.1 (3 seeds):
  `momentum` 0.843, `predict` 0.803, `momentum_strength=2` 0.663: no method tried closes it.
- 784-1024-1024-10 MLP (about 40 ms per step): within 1 point at lr 0.05 and 0.1 (uncompensated 0.933 at 0.1).
- Adam lr 0.01: 0.965 vs 0.962 (0.949 uncompensated). Momentum 0 and 0.5: within 1 point with or without.
- Ablations at lr 0.2: 1:3 (E[s] 1.06) 0.937, 1:2 (E[s] 0.77) 0.963, layerwise=False (E[s] 0.90) 0.968:
  more staleness, lower accuracy for 1:3 (-2.6 points); D-ASGD's whole-model updates were not worse here.
- Two ranks (issue model, 4 epochs): Nesterov lr 0.02 0.966 vs DDP 0.965; SGD lr 0.1 0.971 vs DDP 0.969
  (uncompensated 0.882). Time to target with compensation 0.6 s vs DDP 1.1 s and 1.0 s vs 1.3 s (medians).
- Exchange latency: a round took 10-17 ms, i.e. 1-2.5 local steps per round on this workload; an update reaches
  the other replica after about 1.5 rounds, so it lands about 1.5-3.5 of the receiver's updates late. Those
  updates are not in the per-rank staleness (mean 0.5-1.1 on two ranks, about what one device shows), so the
  compensation under-corrects on several ranks; it still matched DDP here.
- Time to target on one device is NOT comparable between plain and PD-ASGD in this table: the single-device runs
  share one process on a loaded machine (load average 3-7 on 2 cores) and plain's fits took 2-10x longer than
  usual (intra-op thread oversubscription). Use `python -m benchmarks.run` for speed; this grid is for accuracy.
- Cost: prediction adds two foreach kernels per parameter per forward and one copy per update; on the digits MLP
  fits took about as long with and without compensation (within the machine's noise).
- Diverged PD-ASGD runs (a NaN loss stops them) are counted at chance accuracy 0.10.
"""


def write_report(rows: list[dict[str, Any]], out: Path, command: str, findings: str = FINDINGS) -> None:
    """``findings``: the full grid's commentary (issue #11); other grids keep theirs in a README beside."""
    summary = summarize(rows)
    settings = sorted({key[0] for key in summary}, key=lambda s: (s[4], s[0], s[1], s[3], s[2]))
    lines = [
        "# Convergence under asynchrony",
        "",
        f"Command: `{command}` (2 shared CPU cores, `nice -n 5`). Final validation accuracy: mean of 3 seeds",
        "[min, max]; time to target: median wall time from train start to the first epoch-end validation at or",
        "above the target (`(n/3)`: only n seeds got there; `never`: none did); `E[s]`: measured mean staleness.",
        "Baseline (plain Lightning on one device, DDP on two) trains the same model, seeds and hyperparameters.",
        "Each PD-ASGD cell is `acc [min, max] | time to target | E[s]`; Δ is the difference to the baseline.",
        "",
        findings,
    ]
    for setting in settings:
        workload, optimizer, lr, momentum, devices = setting
        cells = {key[1:]: value for key, value in summary.items() if key[0] == setting}
        baseline = cells.get(("ddp", 0, "-") if devices > 1 else ("plain", 0, "-"))
        opt = {"sgd": f"SGD momentum {momentum}", "nesterov": f"SGD Nesterov momentum {momentum}",
               "adam": "Adam"}[optimizer]
        first = next(iter(cells.values()))
        lines.append(f"### {workload}, {opt}, lr {lr}, {devices} device(s), {first['epochs']} epochs, "
                     f"target {first['target']}")
        lines.append("")
        lines.append("| configuration | compensation | final acc [min, max] | Δ vs baseline | time to target | E[s] |")
        lines.append("|---|---|---|---|---|---|")
        for (kind, threads, comp), value in sorted(cells.items(), key=lambda kv: (kv[0][0] not in ("plain", "ddp"),
                                                                                   kv[0][1], kv[0][0], kv[0][2])):
            delta = "" if baseline is None or kind in ("plain", "ddp") else f"{value['acc'] - baseline['acc']:+.3f}"
            stal = "" if math.isnan(value["staleness"]) else f"{value['staleness']:.2f}"
            lines.append(f"| {_config_name(kind, threads, devices)} | {comp} | {value['acc']:.3f} "
                         f"[{value['min']:.3f}, {value['max']:.3f}] | {delta} | {value['tt']} | {stal} |")
        lines.append("")
    (out / "convergence.md").write_text("\n".join(lines) + "\n")
    _plot(summary, out / "convergence.png")


def write_paired_report(rows: list[dict[str, Any]], out: Path, command: str) -> None:
    """The ``paired`` grid's table: per row, plain and the default after every epoch (means over the paired seeds),
    the final difference with the spread of the per-seed differences, and the guard's trips; other compensations
    in ``rows`` (earlier defaults) get their final accuracy in a column of their own."""
    from lightning_pdasgd.engine.compensation import DEFAULT_STALENESS_COMPENSATION as default

    by_row: dict[tuple, dict[str, dict[int, dict[str, Any]]]] = defaultdict(lambda: defaultdict(dict))
    for row in rows:
        setting = (row["workload"], row["optimizer"], row["lr"], row["momentum"], row["epochs"])
        by_row[setting][row.get("label", row["compensation"])][row["seed"]] = row
    others = sorted({row.get("label", row["compensation"]) for row in rows} - {"-", default})
    lines = [
        "# The default against plain Lightning, paired seeds (issue #20's goals)",
        "",
        f"Command: `{command}`. Each seed trains plain Lightning and PD-ASGD (the default threads: 1 forward : 2",
        "backward, or 1 : 1 with two losses in flight on a CPU with under 3 cores; the default",
        f"`staleness_compensation=\"{default}\"`, synchronous warm-up and divergence guard) on the same data",
        "order and initial weights. Accuracies are validation accuracy after each epoch, mean over the seeds;",
        "Δ = PD-ASGD - plain at the",
        "end (mean, and [min, max] of the per-seed differences); worst epoch gap = the largest mean shortfall of",
        "PD-ASGD at any epoch's end; E[s] = measured mean staleness"
        + (f"; the last column(s): final accuracy of {', '.join(others)} on the same seeds." if others else "."),
        "",
        "| row | seeds | plain per epoch | PD-ASGD per epoch | Δ final [min, max] | worst epoch gap | plain final"
        " [min, max] | guard trips | E[s] |" + "".join(f" {other} |" for other in others),
        "|---|---|---|---|---|---|---|---|---|" + "---|" * len(others),
    ]
    for (workload, optimizer, lr, momentum, epochs), methods in by_row.items():
        seeds = sorted(set(methods.get("-", {})) & set(methods.get(default, {})))
        if not seeds:
            continue
        plain = [methods["-"][seed] for seed in seeds]
        pd = [methods[default][seed] for seed in seeds]
        per_epoch = [[_mean([r["accuracies"][e] for r in runs]) for e in range(epochs)] for runs in (plain, pd)]
        deltas = [b["final_accuracy"] - a["final_accuracy"] for a, b in zip(plain, pd)]
        gap = max(p - q for p, q in zip(*per_epoch))
        opt = {"sgd": f"SGD momentum {momentum}", "nesterov": f"SGD Nesterov {momentum}", "adam": "Adam",
               "adamw": "AdamW"}[optimizer]
        finals = [r["final_accuracy"] for r in plain]
        extra = "".join(
            f" {_mean([methods[other][s]['final_accuracy'] for s in seeds if s in methods.get(other, {})]):.3f} |"
            if any(s in methods.get(other, {}) for s in seeds) else " |"
            for other in others
        )
        lines.append(
            f"| {workload}, {opt}, lr {lr}, {epochs} epochs | {len(seeds)} | "
            + ", ".join(f"{a:.3f}" for a in per_epoch[0]) + " | " + ", ".join(f"{a:.3f}" for a in per_epoch[1])
            + f" | {_mean(deltas):+.3f} [{min(deltas):+.3f}, {max(deltas):+.3f}] | {gap:+.3f} |"
            f" {_mean(finals):.3f} [{min(finals):.3f}, {max(finals):.3f}] |"
            f" {sum(r['guard_trips'] or 0 for r in pd)} | {_mean([r['staleness_mean'] for r in pd]):.2f} |" + extra
        )
    (out / "convergence.md").write_text("\n".join(lines) + "\n")


def _plot(summary: dict[tuple, dict[str, Any]], path: Path) -> None:
    """Final accuracy vs lr on the issue's model (every method), and the default vs none on the other workloads."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    ax = axes[0]
    curves: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for (setting, kind, threads, comp), value in summary.items():
        workload, optimizer, lr, momentum, devices = setting
        if workload != "digits-mlp-small" or optimizer != "sgd" or momentum != 0.9 or devices != 1:
            continue
        if kind == "plain":
            curves["plain Lightning"].append((lr, value["acc"]))
        elif kind == "pdasgd" and threads == 2:
            curves[f"PD-ASGD 1:2, {comp}"].append((lr, value["acc"]))
    for label, points in sorted(curves.items()):
        points.sort()
        style = dict(color="black", linewidth=2.5) if label.startswith("plain") else {}
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label, **style)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (SGD, momentum 0.9)")
    ax.set_ylabel("final validation accuracy (mean of 3 seeds)")
    ax.set_title("digits-mlp-small (issue #11 model), 1 device, 3 epochs")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)

    ax = axes[1]
    labels, base, none, comp_vals = [], [], [], []
    for setting in sorted({key[0] for key in summary}):
        cells = {key[1:]: value for key, value in summary.items() if key[0] == setting}
        workload, optimizer, lr, momentum, devices = setting
        kind = "ddp" if devices > 1 else "plain"
        threads = 2
        if (kind, 0, "-") not in cells or ("pdasgd", threads, "none") not in cells:
            continue
        default = [c for (k, t, c) in cells if k == "pdasgd" and t == threads and c not in ("none", "-")]
        chosen = "predict+momentum" if "predict+momentum" in default else (default[0] if default else None)
        if chosen is None:
            continue
        labels.append(f"{workload}\n{optimizer} lr{lr} m{momentum} x{devices}")
        base.append(cells[(kind, 0, "-")]["acc"])
        none.append(cells[("pdasgd", threads, "none")]["acc"])
        comp_vals.append(cells[("pdasgd", threads, chosen)]["acc"])
    xs = range(len(labels))
    width = 0.27
    ax.bar([x - width for x in xs], base, width, label="plain / DDP", color="black")
    ax.bar(list(xs), none, width, label="PD-ASGD, none")
    ax.bar([x + width for x in xs], comp_vals, width, label="PD-ASGD, predict+momentum (default)")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(labels, rotation=70, fontsize=6)
    ax.set_ylim(0, 1.0)
    ax.set_ylabel("final validation accuracy")
    ax.set_title("every setting: baseline vs PD-ASGD without / with compensation")
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--grid", default="quick",
                        choices=("quick", "full", "multi", "deep", "deep-guard", "paired", "guard", "warmup", "zoo",
                                 "shared", "finetune", "clipping"))
    parser.add_argument("--out", default="/tmp/conv")
    parser.add_argument("--seeds", type=int, help="every row on seeds 0..N-1 instead of its own")
    parser.add_argument("--workloads", help="only the rows of these workloads (comma-separated names)")
    parser.add_argument("--report", action="store_true",
                        help="only (re)write convergence.md/.png from OUT (with --grid: which grid OUT holds)")
    args = parser.parse_args()
    if args.worker:
        _worker(args.worker)
        return
    out = Path(args.out)
    if args.report:
        rows = [json.loads(line) for line in (out / "convergence.jsonl").read_text().splitlines()]
        if args.grid in ("paired", "warmup", "zoo", "shared", "finetune", "clipping"):
            command = f"nice -n 5 python -m benchmarks.convergence --grid {args.grid} --out {out}"
            write_paired_report(rows, out, command)
        elif args.grid in ("full", "multi"):
            write_report(rows, out, "nice -n 5 python -m benchmarks.convergence --grid full && ... --grid multi"
                         " --out benchmarks/results")
        else:
            write_report(rows, out, f"nice -n 5 python -m benchmarks.convergence --grid {args.grid} --out {out}", "")
        return
    import logging
    import warnings

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    out.mkdir(parents=True, exist_ok=True)
    cells = _multi_cells() if args.grid == "multi" else _cells(args.grid)
    cells = _selected(cells, args.seeds, args.workloads)
    run_grid(cells, out)
    rows = [json.loads(line) for line in (out / "convergence.jsonl").read_text().splitlines()]
    command = " ".join(["python -m benchmarks.convergence", *sys.argv[1:]])
    if args.grid in ("paired", "warmup", "zoo", "shared", "finetune", "clipping"):
        write_paired_report(rows, out, command)
    else:
        write_report(rows, out, command, FINDINGS if args.grid in ("full", "multi") else "")


if __name__ == "__main__":
    main()
