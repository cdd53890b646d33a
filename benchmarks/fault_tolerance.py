"""Fault tolerance, measured: what losing one of three replicas costs (stall, rejoin, accuracy).

``python -m benchmarks.fault_tolerance --repeats 3`` runs, interleaved, two scenarios of the digits MLP with
BatchNorm on ``PDASGDStrategy(fault_tolerant=True)`` (``tests/ft_lightning_replica.py``), three replicas, each its
own process, against a lighthouse this script starts (``--heartbeat_timeout_ms 2000``, as docs/fault-tolerance.md
recommends):

* ``undisturbed``: three replicas for every epoch;
* ``lost-one``: the third replica is SIGKILLed after its 20th batch (in the second epoch); a replacement starts as
  soon as it is dead, and the survivors hold the third epoch's start until it is in the quorum, so the job trains
  with two replicas for the rest of the second epoch;
* ``frozen``: the third replica is SIGSTOPped after its 20th batch (a hung machine: its sockets stay open and it
  answers nothing, so only the timeouts find it) and the two others finish the fit alone.

It reports, per scenario, the final validation accuracy (the lowest live replica's), the survivors' longest exchange
round (their stall: a round against the dead replica fails after ``ft_timeout``, 2 s here), the rounds that failed,
and how long the replacement took from ``trainer.fit`` to its first batch. Medians over the repeats; the machine is
described in the output.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 4


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _replica(out: Path, lighthouse: str, slot: int, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "TORCHFT_LIGHTHOUSE": lighthouse, "PYTHONPATH": str(REPO)}
    log = open(out / f"replica{slot}-{len(list(out.glob(f'replica{slot}-*.log')))}.log", "w")  # noqa: SIM115
    return subprocess.Popen(
        [sys.executable, "-m", "tests.ft_lightning_replica", str(out), str(slot), str(EPOCHS), *extra],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
    )


def run_scenario(name: str, out: Path) -> dict[str, Any]:
    """One run of ``name`` ("undisturbed" or "lost-one") in ``out``; what the replicas recorded."""
    binary = shutil.which("torchft_lighthouse") or str(Path(sys.executable).parent / "torchft_lighthouse")
    port = _free_port()
    lighthouse = subprocess.Popen(
        [binary, "--min_replicas", "1", "--bind", f"[::]:{port}", "--join_timeout_ms", "100",
         "--heartbeat_timeout_ms", "2000"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    address = f"http://localhost:{port}"
    try:
        waits = ("--wait-for-replicas", "3", "--wait-epochs", "0,2" if name == "lost-one" else "0")
        survivors = [_replica(out, address, slot, *waits) for slot in (0, 1)]
        frozen = None
        if name == "lost-one":
            victim = _replica(out, address, 2, "--die-after", "20", "--wait-for-replicas", "3", "--wait-epochs", "0")
            if victim.wait(300) != -9:
                raise RuntimeError(f"the victim was not killed: see {out}")
            third = _replica(out, address, 2)
        elif name == "frozen":
            frozen = _replica(out, address, 2, "--freeze-after", "20", "--wait-for-replicas", "3", "--wait-epochs", "0")
            third = None
        else:
            third = _replica(out, address, 2, *waits)
        running = [*survivors, third] if third is not None else survivors
        codes = [process.wait(600) for process in running]
        if frozen is not None:
            frozen.kill()
            frozen.wait(10)
        if any(codes):
            raise RuntimeError(f"{name}: replicas exited with {codes}: see {out}")
    finally:
        lighthouse.kill()
        lighthouse.wait(10)
    slots = (0, 1, 2) if name != "frozen" else (0, 1, 1)  # frozen: no third record; the survivor's stands in
    records = [json.loads((out / f"replica{slot}.json").read_text()) for slot in slots]
    return {
        "scenario": name,
        "accuracy": records[0]["val_accuracy"][-1],
        "global_steps": [record["global_step"] for record in records],
        "survivor_longest_round_s": max(record["longest_round_s"] for record in records[:2]),
        "survivor_failed_rounds": sum(record["failed_rounds"] for record in records[:2]),
        "third_first_batch_after_s": records[2]["first_batch_after_s"] if name != "frozen" else float("nan"),
        "third_trained": records[2]["trained"],
        "fit_s": max(record["fit_s"] for record in records[:2]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/fault-tolerance")
    args = parser.parse_args()
    rows = []
    for repeat in range(args.repeats):
        for name in ("undisturbed", "lost-one", "frozen"):
            with tempfile.TemporaryDirectory() as scratch:
                row = run_scenario(name, Path(scratch))
            row["repeat"] = repeat
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = REPO / args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "runs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    lines = [
        "# Fault tolerance: losing one of three replicas",
        "",
        f"`python -m benchmarks.fault_tolerance --repeats {args.repeats}`;"
        f" {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}."
        " Medians over the repeats (each value: min-max).",
        "",
        "| scenario | final accuracy | survivors' longest round (s) | failed rounds"
        " | replacement: fit to first batch (s) | fit (s) |",
        "|---|---|---|---|---|---|",
    ]
    for name in ("undisturbed", "lost-one", "frozen"):
        mine = [row for row in rows if row["scenario"] == name]

        def cell(key: str, digits: int = 3, mine: list[dict[str, Any]] = mine) -> str:
            values = [row[key] for row in mine]
            return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"

        lines.append(
            f"| {name} | {cell('accuracy')} | {cell('survivor_longest_round_s', 2)} |"
            f" {cell('survivor_failed_rounds', 0)} | {cell('third_first_batch_after_s', 2)} | {cell('fit_s', 1)} |"
        )
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
