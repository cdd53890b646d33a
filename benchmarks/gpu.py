"""GPU throughput: ResNet-18 (CIFAR stem) on CIFAR-10-shaped synthetic data, plain Lightning vs PD-ASGD.

Run ``python -m benchmarks.gpu --out DIR`` on a CUDA machine (no network needed: the data are random tensors of
CIFAR-10's shape, the model is torchvision's ResNet-18 with a 3x3 stride-1 first convolution and no max-pool, or an
identical local definition where torchvision is missing). For each batch size it runs plain Lightning and PD-ASGD
with 1 forward : 1, 2, 3 backward threads and ``"auto"``, and reports samples/s and MFU: model FLOPs per second
(counted once with ``torch.utils.flop_counter``) over the GPU's measured peak (a large bf16 and fp32 matmul).
Writes ``DIR/results.md`` and ``DIR/results.json``. ``--device cpu --steps 3`` is the smoke mode CI runs.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

CONFIGS: dict[str, dict[str, Any] | None] = {
    "plain": None,
    "1:1": dict(backward_threads=1, max_in_flight=2),
    "1:2": dict(backward_threads=2, max_in_flight=3),
    "1:3": dict(backward_threads=3, max_in_flight=4),
    "auto": dict(backward_threads="auto"),
}
AUTO_MIN_STEPS = 300  # the autotuner's trials take at most 10% of a run: 4 candidates x 6 steps need 240


# ----------------------------------------------------------------------------------------------- the model
class _BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock, for machines without torchvision."""

    def __init__(self, inplanes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class _LocalResNet18(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity()
        layers, inplanes = [], 64
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers.append(nn.Sequential(_BasicBlock(inplanes, planes, stride), _BasicBlock(planes, planes, 1)))
            inplanes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18_cifar() -> tuple[nn.Module, str]:
    """ResNet-18 with the CIFAR stem (3x3 stride-1 conv, no max-pool); which implementation was used."""
    try:
        import torchvision

        model = torchvision.models.resnet18(num_classes=10)
        model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
        return model, f"torchvision {torchvision.__version__}"
    except ImportError:
        return _LocalResNet18(), "local definition (torchvision missing)"


class SyntheticCifar(Dataset):
    """CIFAR-10-shaped random images and labels, generated once (the GPU machine has no network)."""

    def __init__(self, size: int, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.images = torch.randn(size, 3, 32, 32, generator=generator)
        self.labels = torch.randint(0, 10, (size,), generator=generator)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.labels[index]


def _lightning_module() -> Any:
    import lightning as L

    class ResNetModule(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model, self.source = resnet18_cifar()

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            images, labels = batch
            return nn.functional.cross_entropy(self.model(images), labels)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)

    return ResNetModule()


# ----------------------------------------------------------------------------------------------- measurements
def matmul_peak(device: torch.device, dtype: torch.dtype, size: int = 8192, repeats: int = 20) -> float:
    """Measured peak FLOP/s of one large matmul in ``dtype`` (the MFU denominator)."""
    if device.type != "cuda":
        size, repeats = 512, 3
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _synchronize(device)
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _synchronize(device)
    return 2.0 * size**3 * repeats / (time.perf_counter() - started)


def train_flops_per_sample(device: torch.device, batch_size: int) -> float:
    """Forward + backward FLOPs of one sample, counted by torch's FlopCounterMode on one step."""
    from torch.utils.flop_counter import FlopCounterMode

    model, _ = resnet18_cifar()
    model.to(device)
    images = torch.randn(batch_size, 3, 32, 32, device=device)
    labels = torch.randint(0, 10, (batch_size,), device=device)
    counter = FlopCounterMode(display=False)
    with counter:
        nn.functional.cross_entropy(model(images), labels).backward()
    return counter.get_total_flops() / batch_size


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_one(
    config: str, batch_size: int, warmup: int, steps: int, device: torch.device, precision: str
) -> dict[str, Any]:
    """One fit; samples/s over the last ``steps`` steps (the engine drained and the GPU synchronised at the end)."""
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    from lightning_pdasgd import PDASGDStrategy

    kwargs = CONFIGS[config]
    total = warmup + steps
    if config == "auto":
        total = max(total, AUTO_MIN_STEPS + steps) if device.type == "cuda" else total
    start_step = total - steps

    class Clock(Callback):
        def __init__(self) -> None:
            self.started = 0.0
            self.stopped = 0.0

        def on_train_batch_start(self, trainer: Any, *args: Any) -> None:
            if trainer.global_step == start_step and not self.started:
                _synchronize(device)
                self.started = time.perf_counter()

        def on_train_end(self, trainer: Any, *args: Any) -> None:
            _synchronize(device)  # runs after the strategy's last drain: every update is applied
            self.stopped = time.perf_counter()

    torch.manual_seed(0)
    module = _lightning_module()
    clock = Clock()
    strategy: Any = "auto" if kwargs is None else PDASGDStrategy(metrics="off", **kwargs)
    trainer = L.Trainer(
        strategy=strategy, accelerator=device.type, devices=1, precision=precision, max_steps=total,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[clock], num_sanity_val_steps=0,
    )
    loader = DataLoader(SyntheticCifar(batch_size * min(total, 64)), batch_size=batch_size, shuffle=True,
                        drop_last=True, pin_memory=device.type == "cuda")
    trainer.fit(module, loader)
    if clock.started == 0.0:
        _synchronize(device)
        clock.started = clock.stopped = time.perf_counter()
    elapsed = max(clock.stopped - clock.started, 1e-9)
    result: dict[str, Any] = dict(config=config, batch_size=batch_size, steps=steps, seconds=elapsed,
                                  samples_per_s=steps * batch_size / elapsed, model=module.source)
    engine = getattr(strategy, "backward_threads", None)
    if kwargs is not None:
        result["backward_threads"] = engine
        result["stats_backwards"] = strategy.stats.total_backwards
    return result


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def write_report(out: Path, report: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=2))
    lines = [
        "# GPU benchmark: ResNet-18 (CIFAR stem), CIFAR-10-shaped synthetic data",
        "",
        f"Device: **{report['device']}**; torch {report['torch']}; precision `{report['precision']}`; model"
        f" {report['model']}; {report['steps']} timed steps after {report['warmup']} warm-up steps.",
        f"Measured peak: bf16 matmul {report['peak_bf16_tflops']:.1f} TFLOP/s, fp32 matmul"
        f" {report['peak_fp32_tflops']:.1f} TFLOP/s; {report['gflops_per_sample']:.2f} GFLOP per sample"
        " (forward + backward, FlopCounterMode). MFU is against the peak of the run's precision"
        f" ({report['mfu_peak']}).",
        "",
        "| batch | config | samples/s | vs plain | MFU |",
        "|---:|---|---:|---:|---:|",
    ]
    for row in report["runs"]:
        lines.append(
            f"| {row['batch_size']} | {row['config']} | {row['samples_per_s']:.0f} | {row['vs_plain']:.2f}x |"
            f" {100 * row['mfu']:.1f}% |"
        )
    (out / "results.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu"))
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (smoke mode)")
    parser.add_argument("--batch-sizes", default="32,128")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--steps", type=int, default=100, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--precision", default=None, help="Lightning precision (default: bf16-mixed on CUDA)")
    args = parser.parse_args(argv)

    import lightning_pdasgd  # noqa: F401 - registers strategy="pdasgd"

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmarks.gpu: no CUDA device; pass `--device cpu` for the smoke mode")
    precision = args.precision or ("bf16-mixed" if device.type == "cuda" else "32-true")
    batch_sizes = [int(size) for size in args.batch_sizes.split(",")]
    configs = [name for name in args.configs.split(",") if name]
    unknown = sorted(set(configs) - set(CONFIGS))
    if unknown:
        raise SystemExit(f"benchmarks.gpu: unknown configs {unknown}; choose from {sorted(CONFIGS)}")
    peak_bf16 = matmul_peak(device, torch.bfloat16)
    peak_fp32 = matmul_peak(device, torch.float32)
    flops = train_flops_per_sample(device, min(batch_sizes))
    peak = peak_bf16 if "bf16" in precision else peak_fp32
    runs = []
    for batch_size in batch_sizes:
        plain_rate = None
        for config in configs:
            row = run_one(config, batch_size, args.warmup, args.steps, device, precision)
            row["mfu"] = row["samples_per_s"] * flops / peak
            if config == "plain":
                plain_rate = row["samples_per_s"]
            row["vs_plain"] = row["samples_per_s"] / plain_rate if plain_rate else float("nan")
            runs.append(row)
            print(f"[benchmarks.gpu] batch {batch_size} {config}: {row['samples_per_s']:.0f} samples/s", flush=True)
    report = dict(
        device=_device_name(device), torch=torch.__version__, precision=precision, steps=args.steps,
        warmup=args.warmup, peak_bf16_tflops=peak_bf16 / 1e12, peak_fp32_tflops=peak_fp32 / 1e12,
        gflops_per_sample=flops / 1e9, mfu_peak="bf16" if "bf16" in precision else "fp32",
        model=runs[0]["model"] if runs else "", runs=runs,
    )
    write_report(args.out, report)
    return report


if __name__ == "__main__":
    main()
