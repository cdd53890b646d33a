"""Weight access (issue #19): staleness by depth, memory over plain Lightning, and the cost of reading the weights.

    python -m benchmarks.weight_access --out benchmarks/results/weight_access    # about 3 minutes on 2 cores

- Staleness by depth: a 12-layer MLP (64-256x11-10, one bucket per Linear, 1:2 threads, no compensation), the
  mean staleness of the bucket the forward reaches first (input side) and last (output side), with lazy reads and
  with every bucket read when the step starts, in one run of this script.
- Memory: peak RSS of a fresh process training the 784-1024-1024-10 MLP (7.1 MiB of parameters, batch 128) under
  plain Lightning and under PD-ASGD at ``max_in_flight`` 2 and 8, with the divergence guard on and off; the extra
  RSS over plain in multiples of the parameter bytes. Each configuration runs ``--repeats`` times in its own
  process; the median is reported.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def _quiet() -> None:
    import logging
    import warnings

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


def _trainer(strategy: Any, steps: int, **kwargs: Any) -> Any:
    import lightning.pytorch as pl

    return pl.Trainer(accelerator="cpu", devices=1, strategy=strategy, max_steps=steps, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, **kwargs)


class _Module:
    """Builds the LightningModule lazily (the worker imports Lightning only in its own process)."""

    @staticmethod
    def make(net: nn.Module, lr: float) -> Any:
        import lightning.pytorch as pl

        class Net(pl.LightningModule):
            def __init__(self) -> None:
                super().__init__()
                self.net = net

            def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
                x, y = batch
                return nn.functional.cross_entropy(self.net(x), y)

            def configure_optimizers(self) -> torch.optim.Optimizer:
                return torch.optim.SGD(self.parameters(), lr=lr, momentum=0.9)

        return Net()


def _loader(features: int, samples: int, batch: int, seed: int = 0) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, features, generator=generator)
    y = torch.randint(0, 10, (samples,), generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=True, generator=generator)


# ------------------------------------------------------------------------------------------------ staleness by depth
def staleness_by_depth(lazy: bool, steps: int = 600) -> dict[str, float]:
    from lightning.pytorch.callbacks import Callback

    from lightning_pdasgd import PDASGDStrategy
    from lightning_pdasgd.engine.metrics import STALENESS_FIRST_BUCKET, STALENESS_LAST_BUCKET

    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(64, 256), nn.ReLU()]
    for _ in range(10):
        layers += [nn.Linear(256, 256), nn.ReLU()]
    layers.append(nn.Linear(256, 10))
    seen: dict[str, list[float]] = {STALENESS_FIRST_BUCKET: [], STALENESS_LAST_BUCKET: []}

    class Collect(Callback):
        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            for key, values in seen.items():
                if key in trainer.callback_metrics:
                    values.append(float(trainer.callback_metrics[key]))

    strategy = PDASGDStrategy(bucket_numel=0, metrics="full", staleness_compensation="none", lazy_reads=lazy,
                              divergence_guard=False, metrics_on_progress_bar=False)
    trainer = _trainer(strategy, steps, callbacks=[Collect()], log_every_n_steps=20)
    trainer.fit(_Module.make(nn.Sequential(*layers), 0.01), _loader(64, 32 * steps, 32))
    first, last = statistics.mean(seen[STALENESS_FIRST_BUCKET]), statistics.mean(seen[STALENESS_LAST_BUCKET])
    return {"first_bucket": first, "last_bucket": last, "ratio": last / first if first else float("nan"),
            "mean": strategy.stats.mean_staleness}


# ------------------------------------------------------------------------------------------------ memory
def _memory_worker(spec: dict[str, Any]) -> dict[str, Any]:
    _quiet()
    from lightning_pdasgd import PDASGDStrategy

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))
    parameter_bytes = sum(p.numel() * p.element_size() for p in net.parameters())
    loader = _loader(784, 128 * spec["steps"], 128)
    batch = next(iter(loader))  # touch the data and the loader once before the baseline is read
    del batch
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    strategy: Any = "auto"
    if spec["kind"] == "pdasgd":
        strategy = PDASGDStrategy(max_in_flight=spec["in_flight"], backward_threads=min(spec["in_flight"], 2),
                                  divergence_guard=spec["guard"], staleness_compensation=spec["compensation"])
    started = time.perf_counter()
    _trainer(strategy, spec["steps"]).fit(_Module.make(net, 0.01), loader)
    return {**spec, "peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "start_kib": before,
            "parameter_bytes": parameter_bytes, "fit_s": time.perf_counter() - started}


def memory(repeats: int, steps: int) -> list[dict[str, Any]]:
    configs: list[dict[str, Any]] = [{"kind": "plain", "in_flight": 0, "guard": False, "compensation": "-"}]
    for in_flight in (2, 8):
        for guard in (False, True):
            for compensation in ("none", "predict+momentum"):
                configs.append({"kind": "pdasgd", "in_flight": in_flight, "guard": guard,
                                "compensation": compensation})
    rows = []
    for repeat in range(repeats):
        for config in configs:  # interleaved: every configuration sees the same machine state
            spec = {**config, "steps": steps, "repeat": repeat}
            proc = subprocess.run([sys.executable, "-m", "benchmarks.weight_access", "--worker", json.dumps(spec)],
                                  capture_output=True, text=True, timeout=900)
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return rows


def _summarize_memory(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    def key(row: dict[str, Any]) -> tuple:
        return (row["kind"], row["in_flight"], row["guard"], row["compensation"])

    groups: dict[tuple, list[int]] = {}
    for row in rows:
        groups.setdefault(key(row), []).append(row["peak_kib"])
    plain = statistics.median(groups[("plain", 0, False, "-")])
    parameter_bytes = rows[0]["parameter_bytes"]
    return [
        {"kind": k[0], "max_in_flight": k[1], "guard": k[2], "compensation": k[3],
         "peak_mib": statistics.median(v) / 1024, "extra_mib": (statistics.median(v) - plain) / 1024,
         "extra_x_parameters": (statistics.median(v) - plain) * 1024 / parameter_bytes}
        for k, v in groups.items()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="/tmp/weight_access")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_memory_worker(json.loads(args.worker))))
        return
    _quiet()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    depth = {"lazy": staleness_by_depth(True), "at_start": staleness_by_depth(False)}
    rows = memory(args.repeats, args.steps)
    summary = _summarize_memory(rows)
    (out / "results.json").write_text(json.dumps({"depth": depth, "memory_runs": rows, "memory": summary}, indent=1))
    lines = [
        "# Weight access: staleness by depth and memory",
        "",
        f"`python -m benchmarks.weight_access {' '.join(sys.argv[1:])}`, torch {torch.__version__}, 2-core CPU.",
        "",
        "## Staleness by depth (12-layer MLP, one bucket per layer, 1:2 threads, no compensation)",
        "",
        "| reads | first bucket (input side) | last bucket (output side) | last / first | mean |",
        "|---|---|---|---|---|",
    ]
    for name, values in depth.items():
        lines.append(f"| {name} | {values['first_bucket']:.3f} | {values['last_bucket']:.3f} | {values['ratio']:.3f}"
                     f" | {values['mean']:.3f} |")
    lines += [
        "",
        f"## Peak RSS over plain Lightning (MLP 784-1024-1024-10, {rows[0]['parameter_bytes'] / 2**20:.1f} MiB of"
        f" parameters, {args.steps} steps, median of {args.repeats} processes)",
        "",
        "| run | max_in_flight | guard | compensation | peak MiB | extra MiB | extra / parameter bytes |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in summary:
        lines.append(f"| {row['kind']} | {row['max_in_flight'] or '-'} | {row['guard']} | {row['compensation']} |"
                     f" {row['peak_mib']:.1f} | {row['extra_mib']:.1f} | {row['extra_x_parameters']:.2f} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
