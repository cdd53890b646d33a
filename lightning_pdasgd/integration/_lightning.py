"""The Lightning names of one flavour, for the Lightning-facing modules loaded beside this copy.

Loaded as ``lightning_pdasgd.integration._lightning`` it imports ``lightning.pytorch`` / ``lightning.fabric``;
loaded as ``lightning_pdasgd.pl.integration._lightning`` it imports ``pytorch_lightning`` / ``lightning_fabric``
(see ``_flavor.py``).
Those modules write ``from ._lightning import Callback`` where they wrote ``from lightning.pytorch.callbacks import
Callback``, so one source serves both packages. Both branches list the same names; keep them in step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lightning_pdasgd import _flavor

FLAVOR = _flavor.for_module(__name__)

if FLAVOR is _flavor.PYTORCH_LIGHTNING and not TYPE_CHECKING:
    import lightning_fabric as fabric
    import pytorch_lightning as pytorch
    from lightning_fabric.plugins import CheckpointIO, ClusterEnvironment
    from lightning_fabric.plugins.collectives.torch_collective import default_pg_timeout
    from pytorch_lightning import LightningModule, Trainer
    from pytorch_lightning.accelerators import Accelerator
    from pytorch_lightning.callbacks import Callback
    from pytorch_lightning.plugins.precision import Precision
    from pytorch_lightning.strategies import ParallelStrategy
    from pytorch_lightning.trainer.states import TrainerFn
    from pytorch_lightning.utilities.data import extract_batch_size
    from pytorch_lightning.utilities.exceptions import MisconfigurationException as _OwnMisconfigurationException
    from pytorch_lightning.utilities.rank_zero import rank_zero_info, rank_zero_warn
    from pytorch_lightning.utilities.types import STEP_OUTPUT
else:
    import lightning.fabric as fabric
    import lightning.pytorch as pytorch
    from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
    from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
    from lightning.pytorch import LightningModule, Trainer
    from lightning.pytorch.accelerators import Accelerator
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.plugins.precision import Precision
    from lightning.pytorch.strategies import ParallelStrategy
    from lightning.pytorch.trainer.states import TrainerFn
    from lightning.pytorch.utilities.data import extract_batch_size
    from lightning.pytorch.utilities.exceptions import MisconfigurationException as _OwnMisconfigurationException
    from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
    from lightning.pytorch.utilities.types import STEP_OUTPUT

_OTHER_MISCONFIGURATION = tuple(
    cls
    for cls in _flavor.every_imported("utilities.exceptions.MisconfigurationException")
    if cls is not _OwnMisconfigurationException
)

if _OTHER_MISCONFIGURATION:

    class MisconfigurationException(_OwnMisconfigurationException, *_OTHER_MISCONFIGURATION):  # type: ignore[misc]
        """Lightning's ``MisconfigurationException`` of both packages (both were imported when this loaded).

        One strategy object may serve either package's Trainer, so a refusal must be catchable as either's.
        """

else:
    MisconfigurationException = _OwnMisconfigurationException

__all__ = [
    "STEP_OUTPUT",
    "Accelerator",
    "Callback",
    "CheckpointIO",
    "ClusterEnvironment",
    "FLAVOR",
    "LightningModule",
    "MisconfigurationException",
    "ParallelStrategy",
    "Precision",
    "Trainer",
    "TrainerFn",
    "default_pg_timeout",
    "extract_batch_size",
    "fabric",
    "pytorch",
    "rank_zero_info",
    "rank_zero_warn",
]
