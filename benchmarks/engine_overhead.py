"""The engine's overhead on one device, in one number per mode: PD step time minus plain Lightning's step time.

Two MLPs on random data (no data loading cost to hide behind), each trained for ``--steps`` steps by plain
Lightning, by PD-ASGD's default threads (1 forward : 2 backward, or 1 : 1 with two losses in flight on a CPU with
under 3 cores; ``"1:2"`` on request), by ``max_in_flight=1`` (the exact mode: Lightning's
own step on one device) and by the engine at one loss in flight (``PDASGD_ENGINE_AT_ONE_IN_FLIGHT=1``); on request
(``--modes``) also by the default with its staleness compensation and/or divergence guard off, which splits what
they cost (issue #20's throughput goal). The modes are interleaved within each repeat so that drift of the machine
hits all alike; medians of ``--repeats``. Prints the ratio of throughputs and the overhead per step in microseconds,
and writes them as JSON with ``--out``::

    python -m benchmarks.engine_overhead --repeats 3 --out benchmarks/results/engine_overhead/cpu.json

Steps are timed from the first ``on_train_batch_start`` after ``--warmup`` steps to the last ``on_train_batch_end``
(engine start-up and the final drain are excluded: the per-step cost is what this measures). The asynchronous modes
run their synchronous warm-up during those ``--warmup`` steps, so every timed step is asynchronous.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_pdasgd import PDASGDStrategy
from lightning_pdasgd.engine.thread_control import ENGINE_AT_ONE_IN_FLIGHT


@dataclass(frozen=True)
class Mlp:
    name: str
    sizes: tuple[int, ...]
    batch_size: int


MLPS = (Mlp("mlp-medium", (784, 1024, 1024, 10), 128), Mlp("mlp-small", (64, 256, 256, 10), 32))
# the default's asynchronous steps with parts of it off: what staleness compensation and the divergence guard cost
_PARTS_OFF = {
    "default, no guard": dict(divergence_guard=False),
    "no compensation": dict(staleness_compensation="none"),
    "no compensation, no guard": dict(staleness_compensation="none", divergence_guard=False),
}
MODES = ("plain", "default", "max_in_flight=1", "engine, 1 in flight", "auto", "1:2", *_PARTS_OFF)
DEFAULT_MODES = MODES[:4]  # "auto" is measured over whole runs, trials included: ``--modes auto --warmup 0``


class _Classifier(L.LightningModule):
    def __init__(self, sizes: tuple[int, ...]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
        self.net = nn.Sequential(*layers[:-1])

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


class _StepTimer(L.Callback):
    """Wall time and the process's CPU time (every thread) of the steps after the warm-up (Lightning's own hooks,
    on the loop thread). CPU time varies far less between runs than wall time on a shared machine, and with every
    core busy it is what a mode costs in throughput: it splits costs of a few percent that wall time cannot."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.started = self.ended = 0.0
        self.cpu_started = self.cpu_ended = 0.0
        self.timed = 0

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.warmup:
            self.started, self.cpu_started = time.perf_counter(), time.process_time()

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step > self.warmup:
            self.ended, self.cpu_ended = time.perf_counter(), time.process_time()
            self.timed = trainer.global_step - self.warmup

    @property
    def seconds_per_step(self) -> float:
        return (self.ended - self.started) / max(self.timed, 1)

    @property
    def cpu_seconds_per_step(self) -> float:
        return (self.cpu_ended - self.cpu_started) / max(self.timed, 1)


def _strategy(mode: str, warmup: int) -> Any:
    if mode == "plain":
        return "auto"
    if mode == "auto":
        return PDASGDStrategy(backward_threads="auto")
    if mode in ("max_in_flight=1", "engine, 1 in flight"):
        return PDASGDStrategy(max_in_flight=1, backward_threads=1)
    if mode == "1:2":  # the paper's ratio, explicitly (the default is 1:1 with two losses in flight on 2 CPU cores)
        return PDASGDStrategy(synchronous_warmup=warmup, backward_threads=2)
    # the synchronous warm-up ends within the untimed steps, so the timed ones are all asynchronous
    return PDASGDStrategy(synchronous_warmup=warmup, **_PARTS_OFF.get(mode, {}))


def time_one(
    mlp: Mlp, mode: str, steps: int, warmup: int, seed: int, strategy: Any = None, callbacks: tuple[Any, ...] = ()
) -> float:
    """Seconds per step of one run (``strategy``: instead of ``mode``'s; ``callbacks``: more of Lightning's)."""
    return _timed_run(mlp, mode, steps, warmup, seed, strategy, callbacks).seconds_per_step


def _timed_run(
    mlp: Mlp, mode: str, steps: int, warmup: int, seed: int, strategy: Any = None, callbacks: tuple[Any, ...] = ()
) -> _StepTimer:
    """One run; its timer holds the wall and CPU seconds of the timed steps."""
    torch.manual_seed(seed)
    samples = mlp.batch_size * (steps + warmup)
    data = TensorDataset(torch.randn(samples, mlp.sizes[0]), torch.randint(0, mlp.sizes[-1], (samples,)))
    timer = _StepTimer(warmup)
    if mode == "engine, 1 in flight":  # the engine's own cost at one loss in flight (users get Lightning's step)
        os.environ[ENGINE_AT_ONE_IN_FLIGHT] = "1"
    else:
        os.environ.pop(ENGINE_AT_ONE_IN_FLIGHT, None)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, strategy=strategy if strategy is not None else _strategy(mode, warmup),
        max_steps=steps + warmup, callbacks=[timer, *callbacks],
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(_Classifier(mlp.sizes), DataLoader(data, batch_size=mlp.batch_size))
    return timer


def measure(steps: int, warmup: int, repeats: int, modes: tuple[str, ...] = DEFAULT_MODES) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for mlp in MLPS:
        times: dict[str, list[float]] = {mode: [] for mode in modes}
        cpu_times: dict[str, list[float]] = {mode: [] for mode in modes}
        for repeat in range(repeats):
            for mode in modes:  # interleaved: every repeat times each mode once
                timer = _timed_run(mlp, mode, steps, warmup, seed=repeat)
                times[mode].append(timer.seconds_per_step)
                cpu_times[mode].append(timer.cpu_seconds_per_step)
        plain = statistics.median(times["plain"])
        results[mlp.name] = {
            mode: {
                "ms_per_step": round(statistics.median(values) * 1e3, 4),
                "ratio_to_plain": round(plain / statistics.median(values), 3),
                "overhead_us_per_step": round((statistics.median(values) - plain) * 1e6, 1),
                "runs_ms": [round(value * 1e3, 4) for value in values],
                "cpu_ms_per_step": round(statistics.median(cpu_times[mode]) * 1e3, 4),
                "cpu_runs_ms": [round(value * 1e3, 4) for value in cpu_times[mode]],
            }
            for mode, values in times.items()
        }
    return results


def run_arguments(description: str) -> argparse.ArgumentParser:
    """The options of a run over the MLPs: ``--steps``, ``--warmup``, ``--repeats`` and ``--out``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", help="also write the results as JSON here")
    return parser


def main() -> None:
    parser = run_arguments(__doc__.splitlines()[0])
    parser.add_argument("--modes", nargs="+", default=list(DEFAULT_MODES),
                        help=f"from {MODES} (quote names with spaces); 'plain' is always measured")
    args = parser.parse_args()
    modes = tuple(dict.fromkeys(["plain", *args.modes]))
    unknown = set(modes) - set(MODES)
    if unknown:
        parser.error(f"--modes: unknown {sorted(unknown)}; choose from {MODES}")
    results = measure(args.steps, args.warmup, args.repeats, modes)
    for name, modes in results.items():
        for mode, row in modes.items():
            print(f"{name:11s} {mode:20s} {row['ms_per_step']:8.3f} ms/step  {row['ratio_to_plain']:5.3f}x plain"
                  f"  overhead {row['overhead_us_per_step']:8.1f} us/step  CPU {row['cpu_ms_per_step']:8.3f} ms/step")
    if args.out:
        write_results(args.out, args, results)


def write_results(out: str, args: argparse.Namespace, results: dict[str, Any]) -> None:
    """The results as JSON, with the machine and the run's steps, warm-up and repeats."""
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
               "torch": torch.__version__, "lightning": L.__version__}
    with open(out, "w") as file:
        json.dump({"machine": machine, "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats,
                   "results": results}, file, indent=1)


if __name__ == "__main__":
    main()
