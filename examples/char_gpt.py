"""A small GPT-style character model trained with PD-ASGD on text every machine has: the Python standard library's
own source files (offline, 2 CPU cores).

Run it from the repository root (the config names these classes as ``examples.char_gpt.*``)::

    lightning-pdasgd fit --config examples/configs/char_gpt.yaml
    lightning-pdasgd fit --config examples/configs/char_gpt.yaml --trainer.strategy auto \\
        --trainer.logger.init_args.name char_gpt_plain                              # plain Lightning, to compare
    lightning-pdasgd report lightning_logs/char_gpt --baseline lightning_logs/char_gpt_plain

The recipe is the usual one for Transformers, which is why it is here: AdamW, a linear warm-up into a cosine
decay, and gradient clipping by norm (``gradient_clip_val: 1.0``). At the end of fit it prints a sample of
generated text, so that you can see what the model learned.

Tokens are bytes of ASCII (128 symbols; any other character becomes ``?``), so the vocabulary needs no pass over
the data. The text is the concatenation of the standard library's ``.py`` files in name order, up to
``max_chars``; the last ``val_fraction`` of it is held out for validation.
"""

from __future__ import annotations

import math
import sysconfig
from pathlib import Path

import torch
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

import lightning_pdasgd  # noqa: F401 - registers strategy="pdasgd"

VOCAB_SIZE = 128  # ASCII


def standard_library_text(max_chars: int) -> str:
    """The standard library's Python sources, concatenated in name order, cut at ``max_chars``."""
    root = Path(sysconfig.get_paths()["stdlib"])
    pieces: list[str] = []
    total = 0
    for path in sorted(root.glob("*.py")):
        text = path.read_text(encoding="utf8", errors="replace")
        pieces.append(text)
        total += len(text)
        if total >= max_chars:
            break
    return "".join(pieces)[:max_chars]


def encode(text: str) -> torch.Tensor:
    return torch.tensor([ord(c) if ord(c) < VOCAB_SIZE else ord("?") for c in text], dtype=torch.long)


def decode(tokens: torch.Tensor) -> str:
    return "".join(chr(int(t)) for t in tokens)


class Blocks(Dataset):
    """Windows of ``block_size`` tokens (inputs) and the same window shifted by one (targets)."""

    def __init__(self, tokens: torch.Tensor, block_size: int, stride: int) -> None:
        self.tokens, self.block_size, self.stride = tokens, block_size, stride

    def __len__(self) -> int:
        return max(0, (len(self.tokens) - self.block_size - 1) // self.stride + 1)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = index * self.stride
        window = self.tokens[start : start + self.block_size + 1]
        return window[:-1], window[1:]


class StandardLibraryText(LightningDataModule):
    """Character windows over the standard library's source; the last ``val_fraction`` is the validation text."""

    def __init__(
        self, block_size: int = 64, batch_size: int = 32, max_chars: int = 400_000, val_fraction: float = 0.1
    ) -> None:
        super().__init__()
        self.save_hyperparameters()

    def setup(self, stage: str) -> None:
        tokens = encode(standard_library_text(self.hparams.max_chars))
        split = int(len(tokens) * (1 - self.hparams.val_fraction))
        block = self.hparams.block_size
        self.train_set = Blocks(tokens[:split], block, stride=block)
        self.val_set = Blocks(tokens[split:], block, stride=block)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.hparams.batch_size)


class CausalSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(x).split(width, dim=2)
        q, k, v = (t.view(batch, length, self.heads, width // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(batch, length, width))


class Block(nn.Module):
    """Pre-LayerNorm Transformer block: attention and MLP, each around a residual."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attention = CausalSelfAttention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class CharGPT(LightningModule):
    """A GPT-style decoder over ASCII characters, trained with AdamW, warm-up + cosine and clipping."""

    def __init__(
        self,
        width: int = 128,
        layers: int = 2,
        heads: int = 4,
        block_size: int = 64,
        lr: float = 3e-3,
        weight_decay: float = 0.01,
        warmup_steps: int = 50,
        sample_chars: int = 300,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.token_embedding = nn.Embedding(VOCAB_SIZE, width)
        self.position_embedding = nn.Embedding(block_size, width)
        self.blocks = nn.Sequential(*(Block(width, heads) for _ in range(layers)))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, VOCAB_SIZE)
        self.sample = ""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.token_embedding(tokens) + self.position_embedding(positions)
        return self.head(self.norm(self.blocks(x)))

    def _loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        inputs, targets = batch
        logits = self(inputs)
        return F.cross_entropy(logits.reshape(-1, VOCAB_SIZE), targets.reshape(-1))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.log("val_loss", self._loss(batch), prog_bar=True)

    def configure_optimizers(self) -> dict:
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = min(self.hparams.warmup_steps, total)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = min((step - warmup) / max(total - warmup, 1), 1.0)
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    @torch.no_grad()
    def generate(self, prompt: str, chars: int, temperature: float = 0.8, seed: int = 0) -> str:
        """Sample ``chars`` characters after ``prompt`` (seeded, so two runs can be compared)."""
        generator = torch.Generator(device="cpu").manual_seed(seed)
        tokens = encode(prompt).to(self.device)
        for _ in range(chars):
            logits = self(tokens[-self.hparams.block_size :].unsqueeze(0))[0, -1] / temperature
            probabilities = F.softmax(logits.float(), dim=-1).cpu()
            tokens = torch.cat([tokens, torch.multinomial(probabilities, 1, generator=generator).to(self.device)])
        return decode(tokens.cpu())

    def on_fit_end(self) -> None:
        was_training = self.training
        self.eval()
        self.sample = self.generate("def ", self.hparams.sample_chars)
        self.train(was_training)
        rank_zero_info(f"A sample of generated text:\n{self.sample}\n")


if __name__ == "__main__":
    from lightning.pytorch.cli import LightningCLI

    LightningCLI(CharGPT, StandardLibraryText)
