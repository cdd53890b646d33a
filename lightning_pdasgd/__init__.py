"""lightning-pdasgd: Partial Decoupled Asynchronous SGD as a PyTorch Lightning strategy.

``import lightning_pdasgd`` registers ``Trainer(strategy="pdasgd")``.
"""

from lightning.pytorch.strategies import StrategyRegistry

from lightning_pdasgd.callbacks import EngineDrain
from lightning_pdasgd.engine import EngineTimeoutError
from lightning_pdasgd.exchange import ConsistentPointMismatchError, RankFailedError
from lightning_pdasgd.straggler import Straggler
from lightning_pdasgd.strategy import PDASGDStrategy
from lightning_pdasgd import cli_aliases  # noqa: F401,E402 - LightningCLI: `--trainer.strategy pdasgd` with arguments
from lightning_pdasgd.updates import NonFiniteError

__all__ = [
    "ConsistentPointMismatchError",
    "EngineDrain",
    "EngineTimeoutError",
    "NonFiniteError",
    "PDASGDStrategy",
    "RankFailedError",
    "Straggler",
]
__version__ = "0.1.0"

if PDASGDStrategy.strategy_name not in StrategyRegistry:
    PDASGDStrategy.register_strategies(StrategyRegistry)
