"""An LSTM sequence classifier trained with PD-ASGD, on your text file or on a synthetic task.

Run from the repository root (the config names these classes as ``examples.sequence_classifier.*``)::

    lightning-pdasgd fit --config examples/configs/sequence_classifier.yaml                  # synthetic task
    lightning-pdasgd fit --config examples/configs/sequence_classifier.yaml \\
        --data.train_file reviews.tsv --data.tokenizer word                                   # your data
    lightning-pdasgd report lightning_logs/sequence_classifier

Your data: a UTF-8 text file with one example per line, ``label<TAB>text``. The label is any string without a
tab (``pos``, ``neg``, ``3``); the text is the rest of the line. Empty lines and lines starting with ``#`` are
skipped. ``tokenizer: char`` splits the text into characters, ``tokenizer: word`` at whitespace; the vocabulary is
built from the training examples (tokens seen fewer than ``min_count`` times become ``<unk>``) and texts are cut
to ``max_length`` tokens. Without ``val_file``, a seeded ``val_fraction`` of ``train_file`` is held out.

The synthetic task (no ``train_file``): sequences of 8 to 24 random tokens that contain two marker tokens once each;
the label says whether the first marker comes before the second. No single token gives the label away, so the LSTM
has to remember the first marker it meets until it meets the other one. Half the sequences are of each order.

Expected results, measured on a 2-core CPU (no GPU) with the config as written (synthetic task, 10 epochs of 57
steps, PD-ASGD with 2 backward threads): final validation accuracy 1.0000, reached from the first epoch on; about
17-21 s wall for the whole command, of which 5-9 s is starting Python and importing Lightning. Your own data: not
measured.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import torch
import torchmetrics
from lightning.pytorch import LightningDataModule, LightningModule
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_sequence
from torch.utils.data import DataLoader, Dataset

PAD, UNK = "<pad>", "<unk>"  # ids 0 and 1
Example = tuple[list[int], int]  # token ids, label id


@dataclass
class Vocabulary:
    """Token <-> id, with ``<pad>`` = 0 and ``<unk>`` = 1."""

    tokens: list[str]

    @classmethod
    def build(cls, texts: Sequence[list[str]], min_count: int = 1) -> Vocabulary:
        """From the training texts only, most frequent first (ties in first-seen order), so ids are reproducible."""
        counts = Counter(token for text in texts for token in text)
        kept = [token for token, count in counts.most_common() if count >= min_count]
        return cls([PAD, UNK, *kept])

    def __post_init__(self) -> None:
        self._ids = {token: index for index, token in enumerate(self.tokens)}

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, tokens: list[str]) -> list[int]:
        return [self._ids.get(token, 1) for token in tokens]


def tokenize(text: str, tokenizer: Literal["char", "word"]) -> list[str]:
    return list(text) if tokenizer == "char" else text.split()


def read_tsv(path: Path) -> list[tuple[str, str]]:
    """``(label, text)`` pairs from a ``label<TAB>text`` file; a malformed line fails with its file and number."""
    if not path.is_file():
        raise FileNotFoundError(f"`data.train_file`/`data.val_file` '{path}' does not exist (a label<TAB>text file).")
    pairs = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        label, tab, text = line.partition("\t")
        if not tab or not label:
            raise ValueError(
                f"{path}:{number}: expected `label<TAB>text`, got {line[:60]!r}. Separate the label from the text"
                " with one tab character."
            )
        pairs.append((label, text))
    if not pairs:
        raise ValueError(f"{path}: no `label<TAB>text` line found.")
    return pairs


def synthetic_order_task(size: int, vocab_size: int, min_length: int, max_length: int, seed: int) -> list[Example]:
    """Random sequences holding two marker tokens (ids 2 and 3) once each; label 1 when 2 comes before 3.

    Both markers are in every sequence, so no single token gives the label away: the model has to remember that it
    saw one marker until it meets the other. Balanced and reproducible.
    """
    rng = random.Random(seed)
    first, second, others = 2, 3, range(4, vocab_size)
    examples = []
    for index in range(size):
        tokens = [rng.choice(others) for _ in range(rng.randint(max(min_length, 2), max_length))]
        i, j = sorted(rng.sample(range(len(tokens)), 2))
        label = index % 2
        tokens[i], tokens[j] = (first, second) if label else (second, first)
        examples.append((tokens, label))
    rng.shuffle(examples)
    return examples


class SequenceDataset(Dataset):
    def __init__(self, examples: list[Example]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> Example:
        return self.examples[index]


def collate(batch: list[Example]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad to the longest sequence in the batch: ``(ids [B, T], lengths [B], labels [B])``."""
    sequences = [torch.tensor(ids if ids else [0], dtype=torch.long) for ids, _ in batch]
    lengths = torch.tensor([len(sequence) for sequence in sequences], dtype=torch.long)
    labels = torch.tensor([label for _, label in batch], dtype=torch.long)
    return pad_sequence(sequences, batch_first=True, padding_value=0), lengths, labels


class SequenceDataModule(LightningDataModule):
    """A ``label<TAB>text`` file (``train_file``), or the synthetic marker-order task when none is given.

    After ``setup``, ``vocab_size`` and ``num_classes`` tell the model how large to build itself.

    Args:
        train_file: training examples, one ``label<TAB>text`` per line; ``None`` for the synthetic task.
        val_file: validation examples in the same format; ``None`` holds out ``val_fraction`` of ``train_file``.
        tokenizer: ``char`` (characters) or ``word`` (whitespace-separated words).
        max_length: texts are cut to this many tokens.
        min_count: tokens seen fewer times in the training texts map to ``<unk>``.
        val_fraction: share of ``train_file`` held out when there is no ``val_file``.
        batch_size: training and validation batch size.
        seed: seeds the held-out split and the synthetic task.
        synthetic_size: number of synthetic sequences (90% train, 10% validation).
        synthetic_vocab: number of distinct synthetic tokens.
        synthetic_length: longest synthetic sequence (the shortest is a third of it).
    """

    def __init__(
        self,
        train_file: Optional[str] = None,
        val_file: Optional[str] = None,
        tokenizer: Literal["char", "word"] = "char",
        max_length: int = 256,
        min_count: int = 1,
        val_fraction: float = 0.1,
        batch_size: int = 64,
        seed: int = 0,
        synthetic_size: int = 4000,
        synthetic_vocab: int = 16,
        synthetic_length: int = 24,
    ) -> None:
        super().__init__()
        if not 0 < val_fraction < 1:
            raise ValueError(f"SequenceDataModule: `val_fraction` must be in (0, 1), got {val_fraction}.")
        if synthetic_vocab < 3:
            raise ValueError(f"SequenceDataModule: `synthetic_vocab` must be >= 3, got {synthetic_vocab}.")
        self.save_hyperparameters()
        self.vocabulary: Optional[Vocabulary] = None
        self.labels: list[str] = []
        self.train_set: Optional[SequenceDataset] = None
        self.val_set: Optional[SequenceDataset] = None

    @property
    def vocab_size(self) -> int:
        return len(self.vocabulary) if self.vocabulary is not None else self.hparams.synthetic_vocab + 2

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def setup(self, stage: str) -> None:
        if self.train_set is not None:
            return
        if self.hparams.train_file is None:
            self._setup_synthetic()
        else:
            self._setup_files()

    def _setup_synthetic(self) -> None:
        hp = self.hparams
        examples = synthetic_order_task(
            hp.synthetic_size, hp.synthetic_vocab + 2, max(1, hp.synthetic_length // 3), hp.synthetic_length, hp.seed
        )
        split = int(0.9 * len(examples))
        self.labels = ["second-first", "first-second"]
        self.train_set, self.val_set = SequenceDataset(examples[:split]), SequenceDataset(examples[split:])

    def _setup_files(self) -> None:
        hp = self.hparams
        train = read_tsv(Path(hp.train_file))
        if hp.val_file is not None:
            val = read_tsv(Path(hp.val_file))
        else:
            random.Random(hp.seed).shuffle(train)
            held_out = max(1, int(hp.val_fraction * len(train)))
            train, val = train[held_out:], train[:held_out]
        self.labels = sorted({label for label, _ in train})
        texts = [tokenize(text, hp.tokenizer)[: hp.max_length] for _, text in train]
        self.vocabulary = Vocabulary.build(texts, hp.min_count)
        self.train_set = SequenceDataset(self._encode(train))
        self.val_set = SequenceDataset(self._encode(val))

    def _encode(self, pairs: list[tuple[str, str]]) -> list[Example]:
        assert self.vocabulary is not None
        label_ids = {label: index for index, label in enumerate(self.labels)}
        unknown = sorted({label for label, _ in pairs} - label_ids.keys())
        if unknown:
            raise ValueError(
                f"SequenceDataModule: validation labels {unknown} never occur in `train_file` ({self.labels});"
                " every label must have training examples."
            )
        tokenizer, max_length = self.hparams.tokenizer, self.hparams.max_length
        return [
            (self.vocabulary.encode(tokenize(text, tokenizer)[:max_length]), label_ids[label]) for label, text in pairs
        ]

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, shuffle=True, collate_fn=collate)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=256, collate_fn=collate)


class SequenceClassifier(LightningModule):
    """Embedding -> LSTM -> the last hidden state of each (unpadded) sequence -> linear classifier; Adam.

    ``vocab_size`` and ``num_classes`` are taken from the datamodule at ``setup`` when not given, and saved with the
    hyperparameters, so a checkpoint rebuilds the same model.

    Args:
        embedding_dim: size of the token embeddings.
        hidden_size: LSTM hidden size.
        num_layers: stacked LSTM layers.
        dropout: dropout before the classifier.
        lr: Adam learning rate.
        vocab_size: number of token ids (``None``: from the datamodule).
        num_classes: number of labels (``None``: from the datamodule).
    """

    def __init__(
        self,
        embedding_dim: int = 32,
        hidden_size: int = 64,
        num_layers: int = 1,
        dropout: float = 0.0,
        lr: float = 0.01,
        vocab_size: Optional[int] = None,
        num_classes: Optional[int] = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.embedding: Optional[nn.Embedding] = None
        if vocab_size is not None and num_classes is not None:
            self._build(vocab_size, num_classes)

    def _build(self, vocab_size: int, num_classes: int) -> None:
        hp = self.hparams
        self.embedding = nn.Embedding(vocab_size, hp.embedding_dim, padding_idx=0)
        self.lstm = nn.LSTM(hp.embedding_dim, hp.hidden_size, num_layers=hp.num_layers, batch_first=True)
        self.dropout = nn.Dropout(hp.dropout)
        self.classifier = nn.Linear(hp.hidden_size, num_classes)
        self.train_accuracy = torchmetrics.Accuracy(task="multiclass", num_classes=num_classes)
        self.val_accuracy = torchmetrics.Accuracy(task="multiclass", num_classes=num_classes)

    def setup(self, stage: str) -> None:
        if self.embedding is not None:
            return
        data = self.trainer.datamodule
        if not hasattr(data, "vocab_size") or not hasattr(data, "num_classes"):
            raise ValueError(
                "SequenceClassifier needs `vocab_size` and `num_classes`: give them as `--model.vocab_size` and"
                " `--model.num_classes`, or train with `SequenceDataModule`, which provides both."
            )
        self.hparams.update(vocab_size=data.vocab_size, num_classes=data.num_classes)
        self._build(data.vocab_size, data.num_classes)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        assert self.embedding is not None, "the model is built in setup(); call trainer.fit or pass the sizes"
        packed = pack_padded_sequence(self.embedding(ids), lengths.cpu(), batch_first=True, enforce_sorted=False)
        _, (hidden, _) = self.lstm(packed)
        return self.classifier(self.dropout(hidden[-1]))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        ids, lengths, labels = batch
        logits = self(ids, lengths)
        loss = nn.functional.cross_entropy(logits, labels)
        self.train_accuracy(logits.detach(), labels)
        self.log("train_loss", loss, prog_bar=True)
        self.log("train_acc", self.train_accuracy, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        ids, lengths, labels = batch
        logits = self(ids, lengths)
        self.val_accuracy(logits, labels)
        self.log("val_loss", nn.functional.cross_entropy(logits, labels))
        self.log("val_acc", self.val_accuracy, prog_bar=True)

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
