"""Subprocess entry for one measured run: ``python -m benchmarks.worker SPEC.json``.

One fresh interpreter per run, so intra-op thread pools, ``torch.set_num_threads`` and process groups never leak
between configurations. Multi-device rows are launched by Lightning itself from this script (its subprocess
launcher re-runs the same command line for the other ranks); only global rank 0 writes the result file.

A ``MisconfigurationException`` from the strategy (e.g. PD-ASGD refusing ``devices > 1`` in this release) is a
``skipped`` row with the error message, not a crash, so such rows start measuring as soon as the feature lands.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Optional

_STARTED = time.time()

import lightning.pytorch as pl  # noqa: E402 - start-up time is measured from above the heavy imports
import torch  # noqa: E402
from lightning.fabric.utilities.exceptions import MisconfigurationException  # noqa: E402

import lightning_pdasgd  # noqa: E402
from benchmarks import measure, workloads  # noqa: E402
from benchmarks.configs import Config  # noqa: E402
from benchmarks.lit import Classifier, Data  # noqa: E402
from benchmarks.timing import RunClock  # noqa: E402


def _is_rank_zero() -> bool:
    return int(os.environ.get("NODE_RANK", 0)) == 0 and int(os.environ.get("LOCAL_RANK", 0)) == 0


def _strategy(config: Config) -> Any:
    if config.strategy == "pdasgd":
        return lightning_pdasgd.PDASGDStrategy(
            backward_threads=config.backward_threads,
            max_in_flight=config.max_in_flight,
            layerwise=config.layerwise,
            intra_op_threads=config.intra_op_threads,
            divergence_guard=config.divergence_guard,
            **({} if config.staleness_compensation is None else
               {"staleness_compensation": config.staleness_compensation}),
            **({} if config.replica_merge is None else {"replica_merge": config.replica_merge}),
        )
    return config.strategy  # "auto" or "ddp": Lightning's own


def _steady_samples_per_s(epochs: list[dict[str, float]], warmup_epochs: int) -> tuple[float, int]:
    """Samples/s over the epochs after the warm-up ones (all epochs if there are no others)."""
    steady = epochs[warmup_epochs:] or epochs
    seconds = sum(e["train_s"] for e in steady)
    samples = sum(e["samples"] for e in steady)
    return (samples / seconds if seconds > 0 else math.nan), len(epochs) - len(steady)


def _time_to_target(validations: list[dict[str, float]], target: float) -> tuple[Optional[float], Optional[float]]:
    """Wall and training seconds (since train start) of the first validation at or above ``target``."""
    for entry in validations:
        if entry["accuracy"] >= target:
            return entry["wall_s"], entry["train_s"]
    return None, None


def _overhead(stats: Any) -> Optional[dict[str, float]]:
    """The engine's own cost per step from its counters: copying weights, handing off, applying updates."""
    if stats is None or not getattr(stats, "total_forwards", 0):
        return None
    steps = stats.total_forwards
    return {
        "stash": 1000.0 * stats.total_stash_seconds / steps,
        "handoff": 1000.0 * stats.total_handoff_seconds / steps,
        "update": 1000.0 * stats.total_update_seconds / max(stats.total_backwards, 1),
    }


def run(spec: dict[str, Any]) -> dict[str, Any]:
    config = Config.from_dict(spec["config"])
    workload = workloads.get(spec["workload"])
    result: dict[str, Any] = {
        "run_id": spec["run_id"], "workload": workload.name, "config": config.name, "repeat": spec["repeat"],
        "startup_s": time.time() - spec["spawned_at"], "import_s": time.time() - _STARTED,
    }
    pl.seed_everything(spec["seed"], verbose=False)
    if config.strategy != "pdasgd" and config.intra_op_threads is not None:
        torch.set_num_threads(config.intra_op_threads)
    train, val = workload.datasets(spec["seed"], spec.get("cifar10_dir"), spec.get("train_limit"),
                                   spec.get("val_limit"))
    clock = RunClock()
    callbacks: list[pl.Callback] = [clock]
    straggler = None
    if config.straggler_factor is not None and config.devices > 1:
        straggler = lightning_pdasgd.Straggler(rank=1, factor=config.straggler_factor)
        callbacks.append(straggler)
    trainer = pl.Trainer(
        accelerator=spec["accelerator"], devices=config.devices, strategy=_strategy(config),
        max_epochs=spec["epochs"], val_check_interval=spec.get("val_check_interval", 1.0), callbacks=callbacks,
        num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )
    model = Classifier(workload)
    started = time.perf_counter()
    try:
        trainer.fit(model, datamodule=Data(train, val, workload.batch_size, spec["seed"]))
    except MisconfigurationException as error:
        result.update(status="skipped", reason=str(error))
        return result
    result["fit_s"] = time.perf_counter() - started
    samples_per_s, warmup = _steady_samples_per_s(clock.epochs, spec["warmup_epochs"])
    target = float(spec.get("target_accuracy") or workload.target_accuracy)
    tta_wall, tta_train = _time_to_target(clock.validations, target)
    stats = getattr(trainer.strategy, "stats", None)
    result.update(
        status="ok",
        world_size=trainer.world_size,
        intra_op_threads=clock.intra_op_threads,
        samples_per_s=samples_per_s,
        warmup_epochs_excluded=warmup,
        epochs=clock.epochs,
        validations=clock.validations,
        target_accuracy=target,
        time_to_target_s=tta_wall,
        train_time_to_target_s=tta_train,
        final_accuracy=clock.validations[-1]["accuracy"] if clock.validations else math.nan,
        best_accuracy=max((v["accuracy"] for v in clock.validations), default=math.nan),
        staleness_mean=stats.mean_staleness if stats is not None else None,
        staleness_max=float(stats.total_staleness_max) if stats is not None else None,
        parameter_updates=stats.total_updates if stats is not None else None,
        straggler_sleep_s=straggler.total_sleep_s if straggler is not None else None,
        overhead_ms_per_step=_overhead(stats),
        peak_rss_mib=measure.peak_rss_mib(),
    )
    return result


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    try:
        result = run(spec)
    except Exception as error:  # noqa: BLE001 - recorded as an error row; the parent goes on with the next run
        result = {"run_id": spec["run_id"], "workload": spec["workload"], "config": spec["config"]["name"],
                  "repeat": spec["repeat"], "status": "error", "reason": f"{type(error).__name__}: {error}",
                  "traceback": traceback.format_exc()}
    if _is_rank_zero():
        Path(spec["out"]).write_text(json.dumps(result, indent=2))
    elif result["status"] == "error":
        print(result.get("traceback", result["reason"]), file=sys.stderr)
    # other ranks exit 0 even after a refusal, so Lightning's process observer does not kill rank 0 before it writes


if __name__ == "__main__":
    main()
