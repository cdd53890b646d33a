"""Measurements that turn timings into comparable figures: FLOPs per sample, the machine's peak, memory, machine.

The peak is a large fp32 matmul measured in the same benchmark run (same machine state, same thread count), so
MFU = achieved FLOP/s / measured peak is relative to what this machine actually delivers, not a datasheet.
"""

from __future__ import annotations

import os
import platform
import resource
import statistics
import sys
import time
from importlib import metadata
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_matmul_flops(threads: Optional[int], size: int, repeats: int, device: torch.device) -> dict[str, float]:
    """Best and median FLOP/s of ``size x size`` fp32 matmuls on ``threads`` intra-op threads (CPU) or the GPU."""
    if threads is not None:
        torch.set_num_threads(threads)
    generator = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(device)
    b = torch.randn(size, size, generator=generator).to(device)
    for _ in range(2):  # warm-up: thread pool creation, allocator, clocks
        torch.mm(a, b)
    _synchronize(device)
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        torch.mm(a, b)
        _synchronize(device)
        rates.append(2.0 * size**3 / (time.perf_counter() - started))
    return {"best_flops": max(rates), "median_flops": statistics.median(rates), "size": float(size),
            "repeats": float(repeats), "threads": float(torch.get_num_threads())}


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(x), y)


def flops_per_sample(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """FLOPs of one training batch (forward + backward) and of its forward, per sample, by ``FlopCounterMode``.

    Counts matmuls/convolutions (what the counter knows); element-wise ops, norms and the optimizer step are
    not counted, as is usual for MFU.
    """
    model.train()
    with FlopCounterMode(display=False) as forward_counter:
        loss = _loss(model, x, y)
    with FlopCounterMode(display=False) as backward_counter:
        loss.backward()
    model.zero_grad(set_to_none=True)
    forward = forward_counter.get_total_flops()
    total = forward + backward_counter.get_total_flops()
    return {"train_flops_per_sample": total / len(x), "forward_flops_per_sample": forward / len(x)}


def backward_forward_ratio(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, min_iters: int = 50, budget_s: float = 2.0
) -> dict[str, float]:
    """Median backward time / median forward time of one batch, with plain torch (no framework in the way).

    The ratio says how much work PD-ASGD can move off the forward thread: with ratio r, 1 forward : r backward
    threads is the balanced setting on enough cores.
    """
    model.train()
    device = x.device
    for _ in range(2):
        _loss(model, x, y).backward()
    model.zero_grad(set_to_none=True)
    forward_s: list[float] = []
    backward_s: list[float] = []
    started = time.perf_counter()
    while len(forward_s) < 3 or (len(forward_s) < min_iters and time.perf_counter() - started < budget_s):
        _synchronize(device)
        t0 = time.perf_counter()
        loss = _loss(model, x, y)
        _synchronize(device)
        t1 = time.perf_counter()
        loss.backward()
        _synchronize(device)
        t2 = time.perf_counter()
        model.zero_grad(set_to_none=True)
        forward_s.append(t1 - t0)
        backward_s.append(t2 - t1)
    forward, backward = statistics.median(forward_s), statistics.median(backward_s)
    return {"forward_ms": 1e3 * forward, "backward_ms": 1e3 * backward, "backward_forward_ratio": backward / forward,
            "iterations": float(len(forward_s))}


def peak_rss_mib() -> float:
    """This process's peak resident set size (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024.0 * 1024.0) if sys.platform == "darwin" else rss / 1024.0


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> Optional[float]:
    try:
        with open("/proc/meminfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 1024.0**2, 1)
    except OSError:
        pass
    return None


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine_description() -> dict[str, Any]:
    """What the numbers were measured on; called in a fresh process, so the thread count is torch's default."""
    cuda = torch.cuda.is_available()
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else []
    affinity: Callable[[int], set[int]] | None = getattr(os, "sched_getaffinity", None)
    return {
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "usable_cores": len(affinity(0)) if affinity is not None else os.cpu_count(),
        "memory_gib": _memory_gib(),
        "gpus": gpus,
        "torch_default_num_threads": torch.get_num_threads(),
        "env_threads": {key: os.environ[key] for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if key in os.environ},
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {pkg: _version(pkg) for pkg in ("torch", "lightning", "lightning-pdasgd", "torchmetrics")},
        "torch_build": torch.__version__,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }
