"""Transformer users' flags on Lightning's own demo Transformer, trained on offline text.

The demo's WikiText2 downloads; the same dataset class reads any text file, so the tests write one from the
Python standard library's own source (every machine has it).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.demos import Transformer, WikiText2
from torch.utils.data import DataLoader

from lightning_pdasgd import PDASGDStrategy
from tests.helpers import trainer_kwargs

STEPS = 12


class OfflineTransformer(L.LightningModule):
    """Lightning's demo Transformer (``lightning.pytorch.demos``), small, on a text file of the standard library."""

    def __init__(self, text: Path) -> None:
        super().__init__()
        self.dataset = WikiText2(data_dir=text.parent, block_size=16, download=False)
        self.model = Transformer(vocab_size=self.dataset.vocab_size, ninp=32, nhead=2, nhid=64, nlayers=1)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        inputs, target = batch
        return torch.nn.functional.nll_loss(self.model(inputs, target), target.view(-1))

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.model.parameters(), lr=0.5, momentum=0.9)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=8)


@pytest.fixture(scope="module")
def text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("text") / "wikitext-2.txt"
    path.write_text(inspect.getsource(inspect), encoding="utf8")
    return path


def _weights(strategy: Any, text: Path, **flags: Any) -> torch.Tensor:
    L.seed_everything(0)
    model = OfflineTransformer(text)
    trainer = L.Trainer(strategy=strategy, max_steps=STEPS, limit_val_batches=0, **trainer_kwargs(**flags))
    trainer.fit(model)
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_clipping_by_norm_matches_plain_at_one_loss_in_flight(text: Path) -> None:
    plain = _weights("auto", text, gradient_clip_val=0.25)
    pdasgd = _weights(PDASGDStrategy(max_in_flight=1), text, gradient_clip_val=0.25)
    unclipped = _weights("auto", text)
    assert (plain - unclipped).abs().max() > 1e-3, "the norm bound was never reached: the test checks nothing"
    assert (plain - pdasgd).abs().max() <= 1e-4


def test_accumulation_with_clipping_matches_plain_at_one_loss_in_flight(text: Path) -> None:
    flags: dict[str, Any] = {"gradient_clip_val": 0.25, "accumulate_grad_batches": 3}
    plain = _weights("auto", text, **flags)
    pdasgd = _weights(PDASGDStrategy(max_in_flight=1), text, **flags)
    assert (plain - pdasgd).abs().max() <= 1e-4
