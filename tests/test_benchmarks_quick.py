"""The benchmark harness (``benchmarks/``) runs end to end and writes well-formed results.

The end-to-end test runs ``python -m benchmarks.run --suite smoke`` (every code path once: plain, PD-ASGD, DDP,
multi-device PD-ASGD, calibration, report, plots; about 1-2 minutes on 2 CPU cores) because the 3-minute
``quick`` suite is too long for the default test run. CI runs ``quick`` separately, either directly
(``python -m benchmarks.run --suite quick --out DIR``) or through this file with
``PDASGD_BENCH_SUITE=quick python -m pytest tests/test_benchmarks_quick.py``. No speed figure is asserted: the
machine running the tests is not a benchmark machine.
"""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmarks import aggregate
from benchmarks.configs import SUITES, Config, build_configs, build_suite
from benchmarks.run import plan_runs

REPO_ROOT = Path(__file__).resolve().parent.parent
SUITE = os.environ.get("PDASGD_BENCH_SUITE", "smoke")
DEVICES = 2
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _strict_json(text: str) -> Any:
    def refuse(constant: str) -> None:
        raise ValueError(f"results.json holds {constant}, which is not JSON")

    return json.loads(text, parse_constant=refuse)


def _finite_positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


# --------------------------------------------------------------------------------------------- unit checks (fast)
def test_runs_are_interleaved_and_repeated() -> None:
    suite = build_suite("quick", DEVICES)
    requests = plan_runs(suite, build_configs(DEVICES), {"digits-mlp"}, None)
    essential = ["plain", "pdasgd-1:2"]
    order = [r.config.name for r in requests if r.config.name in essential]
    assert order == essential * 3  # A B A B A B, never A A A B B B
    assert [r.config.name for r in requests].count(f"ddp-x{DEVICES}") == 1
    assert len({r.run_id for r in requests}) == len(requests)


def test_every_suite_names_known_configurations() -> None:
    configs = build_configs(DEVICES)
    for name in SUITES:
        for plan in build_suite(name, DEVICES).plans:
            assert set(plan.configs) <= set(configs), name


def test_straggler_rows_are_normalised_to_each_methods_own_no_delay_run() -> None:
    configs = build_configs(DEVICES)
    runs = [
        {"run_id": "a0", "status": "ok", "samples_per_s": 100.0, "time_to_target_s": 2.0},
        {"run_id": "a1", "status": "ok", "samples_per_s": 50.0, "time_to_target_s": 4.0},
        {"run_id": "b0", "status": "skipped", "reason": "not yet"},
    ]
    entries = [
        aggregate.configuration_entry("w", configs[f"ddp-x{DEVICES}"], [runs[0]]),
        aggregate.configuration_entry("w", configs[f"ddp-x{DEVICES}-straggler-1"], [runs[1]]),
        aggregate.configuration_entry("w", configs[f"pdasgd-1:2-x{DEVICES}"], [runs[2]]),
    ]
    rows = aggregate.straggler_rows(entries, runs, "w", configs)
    by_config = {row["config"]: row for row in rows}
    assert by_config[f"ddp-x{DEVICES}"]["relative_throughput"]["median"] == pytest.approx(1.0)
    assert by_config[f"ddp-x{DEVICES}-straggler-1"]["relative_throughput"]["median"] == pytest.approx(0.5)
    assert by_config[f"ddp-x{DEVICES}-straggler-1"]["relative_time_to_target"]["median"] == pytest.approx(2.0)
    skipped = by_config[f"pdasgd-1:2-x{DEVICES}"]
    assert skipped["status"] == "skipped" and skipped["reason"] == "not yet"


def test_summaries_ignore_non_finite_values() -> None:
    assert aggregate.summarize([3.0, float("nan"), 1.0, None, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0,
                                                                        "n": 3}
    assert aggregate.summarize([float("inf")]) is None


# --------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def bench_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--suite", SUITE, "--out", str(out), "--devices", str(DEVICES)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=900,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    return out


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_results_json_has_every_configuration_with_ok_or_skipped(bench_out: Path) -> None:
    results = _strict_json((bench_out / "results.json").read_text())
    configs = build_configs(DEVICES)
    expected = {(plan.workload, name) for plan in build_suite(SUITE, DEVICES).plans for name in plan.configs}
    present = {(entry["workload"], entry["config"]) for entry in results["configurations"]}
    assert present == expected

    machine = results["calibration"]["machine"]
    assert machine["cpu_model"] and machine["cpu_count"] >= 1 and machine["versions"]["torch"]
    assert all(_finite_positive(peak["best_flops"]) for peak in results["calibration"]["peaks"].values())

    for entry in results["configurations"]:
        config: Config = configs[entry["config"]]
        assert entry["status"] in ("ok", "skipped"), (entry["config"], entry["status"], entry["reason"])
        if entry["status"] == "skipped":
            assert entry["reason"], entry["config"]
            continue
        assert entry["ok_runs"] == entry["runs"] >= 1
        metrics = entry["metrics"]
        for key in ("samples_per_s", "mfu", "peak_rss_mib", "final_accuracy"):
            summary = metrics[key]
            assert summary is not None, (entry["config"], key)
            assert all(_finite_positive(summary[s]) for s in ("median", "min", "max")), (entry["config"], key)
            assert summary["min"] <= summary["median"] <= summary["max"]
        assert 0 < metrics["final_accuracy"]["max"] <= 1
        if config.strategy == "pdasgd":
            assert metrics["staleness_mean"] is not None and math.isfinite(metrics["staleness_mean"]["median"])

    for run in results["runs"]:
        assert run["status"] in ("ok", "skipped"), run.get("reason")
        assert (bench_out / "runs" / f"{run['run_id']}.json").is_file()
        if run["status"] == "ok":
            assert run["validations"] and all(0 <= v["accuracy"] <= 1 for v in run["validations"])
            assert all(_finite_positive(e["train_s"]) for e in run["epochs"])


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_results_md_has_the_table_command_and_machine(bench_out: Path) -> None:
    text = (bench_out / "results.md").read_text()
    assert "python -m benchmarks.run --suite" in text
    assert "## Machine" in text and "| configuration | runs | samples/s |" in text
    assert "| method | rank-1 delay" in text  # the straggler table
    for plan in build_suite(SUITE, DEVICES).plans:
        for name in plan.configs:
            assert f"`{name}`" in text


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_plots_are_valid_pngs(bench_out: Path) -> None:
    results = _strict_json((bench_out / "results.json").read_text())
    assert "throughput.png" in results["plots"] and "straggler.png" in results["plots"]
    for name in results["plots"]:
        data = (bench_out / name).read_bytes()
        assert data[:8] == PNG_SIGNATURE, name
        length, chunk, width, height = struct.unpack(">I4sII", data[8:24])
        assert chunk == b"IHDR" and length == 13 and width > 0 and height > 0, name
        assert data[-8:-4] == b"IEND", name


def test_update_bookkeeping_splits_the_update_paths_samples() -> None:
    """py-spy's raw stacks under the update hook: torch's optimizer frames, the non-finite check, the rest."""
    from benchmarks.update_bookkeeping import classify

    hook = "run (threading.py:1);_on_gradient (lightning_pdasgd/engine/layerwise_updates.py:138)"
    raw = "\n".join([
        f"{hook};step (lightning_pdasgd/engine/bucket_optimizer.py:119);sgd (torch/optim/sgd.py:300) 7",
        f"{hook};screen (lightning_pdasgd/engine/nonfinite.py:80) 2",
        f"{hook};update (lightning_pdasgd/engine/parameter_buckets.py:190) 3",
        "forward (torch/nn/modules/linear.py:125);sgd (torch/optim/sgd.py:300) 5",  # not under the hook
    ])
    assert classify(raw) == {"optimizer": 7, "nonfinite check": 2, "bookkeeping": 3}


def test_compensation_cost_times_the_default_compensation_and_the_guard() -> None:
    """A short run of each MLP: both parts were called and timed, each a share of the process's CPU time; and the
    guard's methods are given back afterwards."""
    from benchmarks.compensation_cost import measure
    from lightning_pdasgd.engine.divergence_guard import DivergenceGuard

    observe = DivergenceGuard.observe
    results = measure(steps=30, warmup=5, repeats=1)
    assert DivergenceGuard.observe is observe
    assert set(results) == {"mlp-medium", "mlp-small"}
    for parts in results.values():
        for part in ("compensation", "guard"):
            assert 0.0 < parts[part]["cpu_share"] < 0.5, (part, parts)


# ------------------------------------------------------------------------------------ the convergence grids (#20)
def test_paired_grid_pairs_every_pdasgd_cell_with_a_plain_one_on_the_same_seed() -> None:
    from benchmarks.convergence import _cells

    cells = _cells("paired")
    plain = {(c["workload"], c["optimizer"], c["lr"], c["seed"]) for c in cells if c["kind"] == "plain"}
    pdasgd = {(c["workload"], c["optimizer"], c["lr"], c["seed"]) for c in cells if c["kind"] == "pdasgd"}
    assert plain == pdasgd and len({key[3] for key in plain}) == 5
    assert {"resnet18-digits", "vgg-bn-digits", "digits-cnn", "cnn32", "lstm-order"} <= {key[0] for key in plain}


def test_seeds_and_workloads_select_rows_of_the_grid_and_keep_every_seed_paired() -> None:
    from benchmarks.convergence import _cells, _selected

    cells = _selected(_cells("paired"), 10, "digits-cnn,cnn32")
    rows = {(c["workload"], c["kind"]) for c in cells}
    assert rows == {(w, k) for w in ("digits-cnn", "cnn32") for k in ("plain", "pdasgd")}
    for workload, kind in rows:
        seeds = sorted(c["seed"] for c in cells if (c["workload"], c["kind"]) == (workload, kind))
        assert seeds == list(range(10)), (workload, kind, seeds)
    assert _selected(_cells("paired"), None, None) == _cells("paired")
    with pytest.raises(SystemExit, match="resnet50"):
        _selected(_cells("paired"), None, "cnn32,resnet50")


def test_a_fine_tune_cell_starts_from_weights_plain_lightning_trained() -> None:
    """``--grid finetune``: plain Lightning trains the model first (``pretrain_epochs`` at ``pretrain_lr``), then the
    cell's own fit starts from those weights with a fresh optimizer at the cell's learning rate."""
    from benchmarks.convergence import _cells, run_one
    from lightning_pdasgd.engine.compensation import DEFAULT_STALENESS_COMPENSATION

    cells = _cells("finetune")
    assert all(cell["pretrain_epochs"] == 10 and cell["pretrain_lr"] == 0.1 for cell in cells)
    assert {cell["kind"] for cell in cells} == {"plain", "pdasgd"} and {cell["lr"] for cell in cells} == {0.01, 0.1}
    assert {cell["compensation"] for cell in cells} == {"-", DEFAULT_STALENESS_COMPENSATION}
    base = dict(workload="digits-mlp-small", epochs=1, lr=0.001, momentum=0.9, seed=0, optimizer="sgd",
                kind="pdasgd", threads=2, compensation=DEFAULT_STALENESS_COMPENSATION)
    fresh = run_one(base)
    tuned = run_one({**base, "pretrain_epochs": 3, "pretrain_lr": 0.1})
    assert tuned["accuracies"][0] > fresh["accuracies"][0] + 0.3, (fresh["accuracies"], tuned["accuracies"])
    assert tuned["guard_trips"] == 0


def test_convergence_cell_trains_the_lstm_example_and_the_paired_report_lists_it(tmp_path: Path) -> None:
    """One epoch of the LSTM example, plain and PD-ASGD with a strategy setting passed through, into the paired
    report: the grid's own path for a module that brings its own optimizer and data."""
    from benchmarks.convergence import run_one, write_paired_report
    from lightning_pdasgd.engine.compensation import DEFAULT_STALENESS_COMPENSATION

    base = dict(workload="lstm-order", epochs=1, lr=0.01, momentum=0.0, seed=0, optimizer="adam")
    rows = [
        run_one({**base, "kind": "plain", "compensation": "-"}),
        run_one({**base, "kind": "pdasgd", "threads": 2, "compensation": DEFAULT_STALENESS_COMPENSATION,
                 "strategy_kwargs": {"bucket_numel": 0}}),
    ]
    assert all(len(row["accuracies"]) == 1 and row["final_accuracy"] > 0.9 for row in rows), rows
    assert rows[1]["staleness_mean"] is not None and rows[1]["guard_trips"] == 0
    write_paired_report(rows, tmp_path, "test")
    table = (tmp_path / "convergence.md").read_text()
    assert "| lstm-order, Adam, lr 0.01, 1 epochs | 1 |" in table
