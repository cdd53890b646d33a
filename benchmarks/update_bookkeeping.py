"""What a bucket update costs besides the optimizer's own arithmetic, from a profile of every thread.

Runs the engine at one loss in flight (``benchmarks.engine_overhead``'s ``"engine, 1 in flight"`` mode) on one MLP
under ``py-spy`` (all threads, raw stacks), and splits the samples taken inside the engine's update path
(``LayerwiseUpdater._on_gradient`` and everything it calls) into:

* the optimizer's own time: samples with a frame in ``torch/optim/`` (torch's SGD/Adam/AdamW kernels and their
  Python), and
* bookkeeping: everything else on that path (locks, versions, staleness and compensation, gradient hand-over,
  statistics), with the non-finite check (``engine/nonfinite.py``) reported on its own, since it is a full pass
  over the gradients rather than per-call overhead.

Prints the counts and the ratio ``bookkeeping / optimizer`` (issue #21's goal: at most 0.2), pooled over
``--repeats`` runs::

    pip install py-spy
    python -m benchmarks.update_bookkeeping --steps 400 --mlp mlp-medium
    python -m benchmarks.update_bookkeeping --steps 4000 --mlp mlp-small --repeats 5
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

UPDATE_ENTRY = "_on_gradient (lightning_pdasgd/engine/layerwise_updates.py"
OPTIMIZER_FRAMES = ("torch/optim/",)
NONFINITE_FRAMES = ("lightning_pdasgd/engine/nonfinite.py",)


def classify(raw_profile: str, where: collections.Counter[str] | None = None) -> dict[str, int]:
    """Samples on the update path by kind, from py-spy's raw output (``frame;frame;... COUNT`` per line);
    ``where`` counts the bookkeeping samples by their innermost frame."""
    counts: collections.Counter[str] = collections.Counter()
    for line in raw_profile.splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit() or UPDATE_ENTRY not in stack:
            continue
        below = stack[stack.index(UPDATE_ENTRY):]
        if any(marker in below for marker in OPTIMIZER_FRAMES):
            counts["optimizer"] += int(count)
        elif any(marker in below for marker in NONFINITE_FRAMES):
            counts["nonfinite check"] += int(count)
        else:
            counts["bookkeeping"] += int(count)
            if where is not None:
                where[below.split(";")[-1]] += int(count)
    return dict(counts)


def profile(mlp: str, steps: int, rate: int) -> str:
    """Raw py-spy samples of one engine-at-one-in-flight run of ``mlp``."""
    if shutil.which("py-spy") is None:
        raise SystemExit("py-spy is not installed: pip install py-spy")
    code = (
        "from benchmarks.engine_overhead import MLPS, time_one;"
        f"mlp = next(m for m in MLPS if m.name == {mlp!r});"
        f"print(time_one(mlp, 'engine, 1 in flight', {steps}, 20, 0))"
    )
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "profile.txt"
        command = ["py-spy", "record", "--threads", "--idle", "-f", "raw", "-r", str(rate), "-o", str(out), "--",
                   sys.executable, "-c", code]
        subprocess.run(command, check=True, capture_output=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
        return out.read_text()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mlp", default="mlp-medium", choices=("mlp-medium", "mlp-small"))
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--top", type=int, default=12, help="bookkeeping frames listed")
    parser.add_argument("--repeats", type=int, default=1,
                        help="profiled runs whose samples are pooled (one run's ratio varies by +-0.05 on 2 cores)")
    args = parser.parse_args()
    where: collections.Counter[str] = collections.Counter()
    counts: collections.Counter[str] = collections.Counter()
    for repeat in range(args.repeats):
        run = classify(profile(args.mlp, args.steps, args.rate), where)
        counts.update(run)
        if args.repeats > 1 and run.get("optimizer"):
            print(f"run {repeat + 1}: bookkeeping / optimizer = {run.get('bookkeeping', 0) / run['optimizer']:.3f}")
    optimizer = counts.get("optimizer", 0)
    for kind in ("optimizer", "bookkeeping", "nonfinite check"):
        print(f"{kind:16s} {counts.get(kind, 0):6d} samples")
    print("bookkeeping by innermost frame:")
    for frame, count in where.most_common(args.top):
        print(f"  {count:6d}  {frame}")
    if optimizer:
        print(f"bookkeeping / optimizer = {counts.get('bookkeeping', 0) / optimizer:.3f}"
              f"  (non-finite check / optimizer = {counts.get('nonfinite check', 0) / optimizer:.3f})")


if __name__ == "__main__":
    main()
