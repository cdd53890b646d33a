"""Subprocess entry for what a benchmark run measures once, before the measured runs.

``python -m benchmarks.calibrate --out F --workloads a,b --devices N [--threads 1,2]`` describes the machine (in a
fresh process, so the thread count is torch's default), profiles each workload with plain torch (FLOPs per sample,
backward/forward time ratio) and measures the fp32 matmul peak on every intra-op thread count a run will use:
1, torch's default, ``cores // devices`` (what Lightning gives each DDP rank on CPU) and any explicit count.
Lightning is not imported.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any, Optional

import torch

from benchmarks import measure, workloads


def _device(accelerator: str) -> torch.device:
    return torch.device("cuda", 0) if accelerator == "gpu" else torch.device("cpu")


def profile_workloads(names: list[str], device: torch.device, seed: int, cifar10_dir: Optional[str]) -> dict[str, Any]:
    """FLOPs per sample and backward/forward time ratio of each workload's model on one real batch."""
    out: dict[str, Any] = {}
    for name in names:
        workload = workloads.get(name)
        reason = workload.unavailable_reason(cifar10_dir)
        if reason is not None:
            out[name] = {"status": "skipped", "reason": reason}
            continue
        torch.manual_seed(seed)
        model = workload.build_model().to(device)
        train, _ = workload.datasets(seed, cifar10_dir, train_limit=workload.batch_size, val_limit=1)
        x, y = (t[: workload.batch_size].to(device) for t in train.tensors)
        entry: dict[str, Any] = {"status": "ok", "batch_size": workload.batch_size,
                                 "parameters": sum(p.numel() for p in model.parameters())}
        entry.update(measure.flops_per_sample(model, x, y))
        entry.update(measure.backward_forward_ratio(model, x, y))
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # also on one thread: less sensitive to other load on the machine
        single = measure.backward_forward_ratio(model, x, y)
        torch.set_num_threads(threads)
        entry.update({f"{key}_1thread": value for key, value in single.items()})
        out[name] = entry
    return out


def thread_counts(usable_cores: int, default: int, devices: int, explicit: list[int]) -> list[int]:
    return sorted({1, default, max(1, usable_cores // devices), *explicit})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True)
    parser.add_argument("--accelerator", default="cpu", choices=("cpu", "gpu"))
    parser.add_argument("--workloads", default="")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--threads", default="", help="explicit intra-op thread counts of some rows, comma-separated")
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cifar10-dir", default=None)
    args = parser.parse_args()
    device = _device(args.accelerator)
    machine = measure.machine_description()  # first: before anything changes the thread count
    result: dict[str, Any] = {"machine": machine, "load_before": os.getloadavg()[0]}
    result["workloads"] = profile_workloads([w for w in args.workloads.split(",") if w], device, args.seed,
                                            args.cifar10_dir)
    if device.type == "cuda":
        result["peaks"] = {"gpu": measure.peak_matmul_flops(None, args.size, args.repeats, device)}
    else:
        explicit = [int(t) for t in args.threads.split(",") if t]
        counts = thread_counts(int(machine["usable_cores"] or 1), machine["torch_default_num_threads"], args.devices,
                               explicit)
        result["peaks"] = {str(t): measure.peak_matmul_flops(t, args.size, args.repeats, device) for t in counts}
    result["load_after"] = os.getloadavg()[0]
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
