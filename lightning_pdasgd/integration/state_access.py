"""Checkpoints hold exactly the updates of the steps they count: every state read or load drains the engine first.

Lightning reads the module's and the optimizer's state (``trainer.save_checkpoint``, ``ModelCheckpoint``) and
loads optimizer state (resume) through the strategy; in-flight backward passes would otherwise land half in, half
out of the checkpoint, or after a load that replaced the state they update.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override


class DrainBeforeStateAccess:
    """A mixin for a ``Strategy`` with a ``drain()`` method (a local consistent point)."""

    def drain(self) -> None:
        """Overridden by the strategy; with no engine there is nothing in flight."""

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        self.drain()
        return super().lightning_module_state_dict()  # type: ignore[misc]

    @override
    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Tensor]:
        self.drain()
        return super().optimizer_state(optimizer)  # type: ignore[misc]

    @override
    def load_optimizer_state_dict(self, checkpoint: Any) -> None:
        self.drain()
        super().load_optimizer_state_dict(checkpoint)  # type: ignore[misc]
