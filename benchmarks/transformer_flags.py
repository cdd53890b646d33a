"""Transformer users' flags (issue #22): final loss of PD-ASGD's default settings against plain Lightning, paired
seeds, with clipping by norm and gradient accumulation on.

    python -m benchmarks.transformer_flags --out benchmarks/results/transformer_flags   # about 6 minutes, 2 cores

- ``char_gpt``: ``examples/char_gpt.py`` as its config runs it (3 epochs on the standard library's source, AdamW,
  warm-up + cosine, ``gradient_clip_val=1.0``); the validation loss at the end.
- ``demo_transformer``: Lightning's demo Transformer (``lightning.pytorch.demos``, width 64) on the same offline
  text (word tokens), SGD lr 0.5, ``gradient_clip_val=0.25``, ``accumulate_grad_batches=2``, 200 optimizer
  steps; the mean training loss of the last 20 steps.

Each seed runs plain and PD-ASGD in this process, one after the other; wall time and tokens per second are
reported beside the losses (a shared CPU: read them as indications, not as the speed suite's numbers).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch


def _quiet() -> None:
    import logging
    import warnings

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


def _trainer(strategy: Any, **kwargs: Any) -> Any:
    import lightning.pytorch as pl

    return pl.Trainer(strategy=strategy, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, **kwargs)  # fmt: skip


def _strategy(name: str) -> Any:
    from lightning_pdasgd import PDASGDStrategy

    return PDASGDStrategy() if name == "pdasgd" else "auto"


def char_gpt(name: str, seed: int) -> dict[str, float]:
    import lightning.pytorch as pl

    from examples.char_gpt import CharGPT, StandardLibraryText

    pl.seed_everything(seed, verbose=False)
    model, data = CharGPT(sample_chars=0), StandardLibraryText()
    trainer = _trainer(_strategy(name), max_epochs=3, gradient_clip_val=1.0)
    started = time.perf_counter()
    trainer.fit(model, data)
    seconds = time.perf_counter() - started
    tokens = len(data.train_set) * 3 * data.hparams.block_size
    return {"loss": float(trainer.callback_metrics["val_loss"]), "seconds": seconds, "tokens_per_s": tokens / seconds}


class _LossLog:
    """The training losses of every batch (a callback, so the same code reads plain and PD-ASGD runs)."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def hook(self) -> Any:
        import lightning.pytorch as pl

        log = self

        class Record(pl.Callback):
            def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, index: int) -> None:
                log.losses.append(float(outputs["loss"]))

        return Record()


def demo_transformer(name: str, seed: int, text: Path) -> dict[str, float]:
    import lightning.pytorch as pl
    from lightning.pytorch.demos import Transformer, WikiText2
    from torch.utils.data import DataLoader

    class Demo(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.dataset = WikiText2(data_dir=text.parent, block_size=32, download=False)
            self.model = Transformer(vocab_size=self.dataset.vocab_size, ninp=64, nhead=2, nhid=128, nlayers=1)

        def training_step(self, batch: Any, index: int) -> torch.Tensor:
            inputs, target = batch
            return torch.nn.functional.nll_loss(self.model(inputs, target), target.view(-1))

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.model.parameters(), lr=0.5)

        def train_dataloader(self) -> DataLoader:
            return DataLoader(self.dataset, batch_size=16, shuffle=True)

    pl.seed_everything(seed, verbose=False)
    log = _LossLog()
    model = Demo()
    trainer = _trainer(_strategy(name), max_steps=200, gradient_clip_val=0.25, accumulate_grad_batches=2,
                       callbacks=[log.hook()])  # fmt: skip
    started = time.perf_counter()
    trainer.fit(model)
    seconds = time.perf_counter() - started
    last = log.losses[-40:]  # 20 optimizer steps of 2 batches
    return {"loss": statistics.mean(last), "seconds": seconds, "tokens_per_s": len(log.losses) * 16 * 32 / seconds,
            "global_step": trainer.global_step}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    _quiet()
    import inspect
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import tempfile

    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as folder:
        text = Path(folder) / "wikitext-2.txt"  # the name the demo's dataset reads
        text.write_text(inspect.getsource(inspect), encoding="utf8")
        for seed in range(args.seeds):
            for workload in ("char_gpt", "demo_transformer"):
                for name in ("plain", "pdasgd"):
                    result = char_gpt(name, seed) if workload == "char_gpt" else demo_transformer(name, seed, text)
                    rows.append({"workload": workload, "strategy": name, "seed": seed, **result})
                    print(json.dumps(rows[-1]), flush=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))
    header = ("| workload | plain loss (mean) | PD-ASGD loss (mean) | PD-ASGD / plain | per seed (plain / PD-ASGD) |"
              " plain tokens/s | PD-ASGD tokens/s |")
    lines = [header, "|---|---|---|---|---|---|---|"]
    for workload in ("char_gpt", "demo_transformer"):
        plain = [r for r in rows if r["workload"] == workload and r["strategy"] == "plain"]
        pdasgd = [r for r in rows if r["workload"] == workload and r["strategy"] == "pdasgd"]
        p, q = statistics.mean(r["loss"] for r in plain), statistics.mean(r["loss"] for r in pdasgd)
        pairs = ", ".join(f"{a['loss']:.3f} / {b['loss']:.3f}" for a, b in zip(plain, pdasgd))
        speed = [statistics.median(r["tokens_per_s"] for r in runs) for runs in (plain, pdasgd)]
        lines.append(f"| {workload} | {p:.3f} | {q:.3f} | {q / p:.3f} | {pairs} | {speed[0]:,.0f} | {speed[1]:,.0f} |")
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
