"""``--trainer.strategy pdasgd --trainer.strategy.backward_threads 3`` in any ``LightningCLI``.

Why a class named ``pdasgd``: with arguments, jsonargparse (which LightningCLI is built on) turns the strategy into a
``class_path``, and it resolves a name without a dot only to an imported subclass of the declared type (``Strategy``)
whose ``__name__`` is that name (``jsonargparse._typehints.resolve_class_path_by_name``). Lightning's strategy
registry name ``pdasgd`` is not a class, so the short spelling failed with "Expected a dot import path string:
pdasgd". jsonargparse has no public API to register an alias, so this module defines the one thing its lookup
understands: a subclass of ``PDASGDStrategy`` called ``pdasgd``, identical in behaviour.

It is defined at module level (not built inside a function) so that a saved ``config.yaml`` naming
``lightning_pdasgd.cli_aliases.pdasgd`` resolves in a fresh process too. The module must stay public (no leading
underscore): jsonargparse ignores classes whose import path contains ``._``.

Without arguments, ``--trainer.strategy pdasgd`` stays the plain string that Lightning's registry resolves to
``PDASGDStrategy``; the spelling that works everywhere is ``--trainer.strategy lightning_pdasgd.PDASGDStrategy``.
"""

from __future__ import annotations

from lightning_pdasgd.strategy import PDASGDStrategy

STRATEGY_ALIAS = "pdasgd"
FULL_CLASS_PATH = "lightning_pdasgd.PDASGDStrategy"


class pdasgd(PDASGDStrategy):  # lower-case on purpose: it is the name users type
    """PD-ASGD strategy: ``PDASGDStrategy`` under the name LightningCLI users type.

    It exists so that jsonargparse resolves ``--trainer.strategy pdasgd`` followed by strategy arguments; it adds
    nothing, every argument, default and behaviour is ``PDASGDStrategy``'s.
    """


def strategy_alias() -> type[PDASGDStrategy]:
    """The class LightningCLI resolves ``pdasgd`` to; importing this module is what makes it resolvable."""
    return pdasgd
