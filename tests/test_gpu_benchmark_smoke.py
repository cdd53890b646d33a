"""The GPU benchmark's smoke mode on CPU, so CI catches breakage of benchmarks/gpu.py without a GPU."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import gpu


def test_gpu_benchmark_smoke_mode_on_cpu(tmp_path: Path) -> None:
    report = gpu.main(["--device", "cpu", "--steps", "3", "--warmup", "1", "--batch-sizes", "2",
                       "--configs", "1:1", "--out", str(tmp_path)])
    assert [row["config"] for row in report["runs"]] == ["1:1"]
    assert all(row["samples_per_s"] > 0 and row["mfu"] > 0 for row in report["runs"])
    assert report["gflops_per_sample"] > 1.0  # ResNet-18 at 32x32 with the CIFAR stem: ~3.3 GFLOP train
    assert json.loads((tmp_path / "results.json").read_text())["device"].startswith("CPU")
    assert "| 2 | 1:1 |" in (tmp_path / "results.md").read_text()
