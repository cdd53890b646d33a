"""Training results before and after an internal change: run on two checkouts, compare the two JSON files.

A refactor once moved a torchvision ResNet-18 from 0.92 to 0.11 by changing thread scheduling alone, so an internal
change is checked on behaviour, not only on the test suite:

- ``max_in_flight=1`` (exact mode): a digits MLP's final weights, hashed -- must be bitwise identical;
- default settings: the digits MLP and a torchvision ResNet-18 with BatchNorm, validation accuracy per seed -- must
  stay within the seed-to-seed spread.

Only the public API is used, so the script runs unchanged on an older checkout::

    python -m benchmarks.behaviour_check --out before.json      # on the old checkout
    python -m benchmarks.behaviour_check --out after.json       # on the new one
    python -m benchmarks.behaviour_check --compare before.json after.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import time

import lightning as L

from lightning_pdasgd import PDASGDStrategy
from tests.helpers import trainer_kwargs
from tests.models import DigitsClassifier, DigitsData, DigitsResNet


def _fit(model: DigitsClassifier, strategy: PDASGDStrategy, epochs: int, batch_size: int) -> DigitsClassifier:
    trainer = L.Trainer(strategy=strategy, max_epochs=epochs, **trainer_kwargs())
    trainer.fit(model, DigitsData(batch_size=batch_size))
    return model


def exact_mode_hash(seed: int = 0) -> str:
    L.seed_everything(seed)
    model = _fit(DigitsClassifier(), PDASGDStrategy(max_in_flight=1, backward_threads=1), 2, 32)
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()


def default_accuracy(kind: str, seed: int) -> float:
    L.seed_everything(seed)
    if kind == "mlp":
        model = _fit(DigitsClassifier(), PDASGDStrategy(), 3, 32)
    else:
        model = _fit(DigitsResNet(), PDASGDStrategy(), 2, 64)
    return float(model.val_accuracy[-1])


def measure(seeds: list[int]) -> dict[str, object]:
    started = time.perf_counter()
    result: dict[str, object] = {"exact_mode_sha256": exact_mode_hash()}
    for kind in ("mlp", "resnet18"):
        result[kind] = [default_accuracy(kind, seed) for seed in seeds]
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def compare(before: dict[str, list[float] | str], after: dict[str, list[float] | str]) -> bool:
    same = before["exact_mode_sha256"] == after["exact_mode_sha256"]
    print(f"max_in_flight=1 weights bitwise identical: {same}")
    for kind in ("mlp", "resnet18"):
        old, new = before[kind], after[kind]
        spread = max(max(old) - min(old), max(new) - min(new))  # type: ignore[arg-type]
        shift = abs(statistics.mean(new) - statistics.mean(old))  # type: ignore[arg-type]
        print(f"{kind}: before {old} after {new}; mean shift {shift:.4f}, seed spread {spread:.4f}")
        same = same and shift <= spread + 1e-9
    return same


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"))
    args = parser.parse_args()
    if args.compare:
        with open(args.compare[0]) as old, open(args.compare[1]) as new:
            raise SystemExit(0 if compare(json.load(old), json.load(new)) else 1)
    result = measure(args.seeds)
    print(json.dumps(result))
    if args.out:
        with open(args.out, "w") as file:
            json.dump(result, file)


if __name__ == "__main__":
    main()
