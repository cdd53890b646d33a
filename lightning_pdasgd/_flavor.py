"""Which Lightning package ("flavour") a program, a class or an object uses -- without importing either package.

Lightning ships twice: the ``lightning`` package (``lightning.pytorch`` + ``lightning.fabric``) and the standalone
``pytorch_lightning`` (+ ``lightning_fabric``), a renamed copy whose classes are distinct, so ``isinstance`` across
the two is always False and each Trainer accepts only its own package's ``Strategy`` (``tools/pl_compat_findings.md``).

So the Lightning-facing modules (``FLAVOURED``) load once per flavour from the same source: as
``lightning_pdasgd.<module>`` for ``lightning`` and as ``lightning_pdasgd.pl.<module>`` for ``pytorch_lightning``
(``pl/__init__.py`` points its ``__path__`` at this folder). Each copy reads its Lightning names from its own
``_lightning`` module and imports its Lightning-facing siblings relatively; the Lightning-free modules (engine,
session, exchange, updates, ...) are imported absolutely, so they and their exceptions exist once for both.

This module (Lightning-free, loaded once) decides the flavour, registers ``strategy="pdasgd"`` with every package
the program imports -- now, or later through a small import hook -- and, when both are imported, makes each
flavour's strategy acceptable to the other's Trainer (ABC virtual subclasses). It never imports a Lightning
package a program did not import, except when asked for a class with neither imported (then ``lightning`` if
installed, else ``pytorch_lightning``).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

PACKAGE = "lightning_pdasgd"
STRATEGY_NAME = "pdasgd"
STRATEGY_DESCRIPTION = "Partial Decoupled Asynchronous SGD (lightning-pdasgd)"

# Modules that name Lightning classes, loaded once per flavour; every other module of the package is imported
# absolutely and exists once (a test checks that nothing else loads under the ``pl`` prefix).
FLAVOURED = (
    "callbacks",
    "cli_aliases",
    "straggler",
    "strategy",
    "integration",
    "integration._lightning",
    "integration._lightning_internals",
    "integration.collectives",
    "integration.engine_backward",
    "integration.engine_calls",
    "integration.engine_hooks",
    "integration.fault_tolerant_fit",
    "integration.fit_sessions",
    "integration.one_process_per_device",
    "integration.preemption",
    "integration.setup_checks",
    "integration.state_access",
    "integration.step_accounting",
    "integration.step_metrics",
)


@dataclass(frozen=True)
class Flavor:
    """One Lightning package: where its Trainer and Fabric live, and where our modules load for it."""

    name: str  # the top-level import name
    pytorch: str  # the Trainer package
    fabric: str
    prefix: str  # the package our Lightning-facing modules load under for this flavour

    def installed(self) -> bool:
        """Whether the package can be imported (asks the import system; imports nothing)."""
        try:
            return importlib.util.find_spec(self.name) is not None
        except (ImportError, ValueError):  # a finder that hides the package raises ModuleNotFoundError
            return False

    def imported(self) -> bool:
        return self.pytorch in sys.modules

    def module(self, path: str = "") -> ModuleType:
        """``<pytorch>.<path>``, e.g. ``callbacks`` -> ``pytorch_lightning.callbacks``."""
        return importlib.import_module(f"{self.pytorch}.{path}" if path else self.pytorch)

    def fabric_module(self, path: str) -> ModuleType:
        return importlib.import_module(f"{self.fabric}.{path}")

    def attribute(self, dotted: str) -> Any:
        """``"callbacks.Timer"`` -> that flavour's ``Timer`` class."""
        path, _, name = dotted.rpartition(".")
        return getattr(self.module(path), name)

    def ours(self, module: str) -> ModuleType:
        """Our Lightning-facing ``module`` loaded for this flavour (loading it, and the package, if needed)."""
        return importlib.import_module(f"{self.prefix}.{module}")


LIGHTNING = Flavor("lightning", "lightning.pytorch", "lightning.fabric", PACKAGE)
PYTORCH_LIGHTNING = Flavor("pytorch_lightning", "pytorch_lightning", "lightning_fabric", f"{PACKAGE}.pl")
FLAVORS = (LIGHTNING, PYTORCH_LIGHTNING)


def for_module(module_name: str) -> Flavor:
    """The flavour a copy of one of our modules was loaded for, from its ``__name__``."""
    return PYTORCH_LIGHTNING if module_name.startswith(PYTORCH_LIGHTNING.prefix + ".") else LIGHTNING


def of(obj: object) -> Flavor | None:
    """The flavour an object's class belongs to (a Trainer, a LightningModule, a callback, one of ours), or None."""
    for cls in type(obj).__mro__:
        module = cls.__module__ or ""
        if module.startswith((PYTORCH_LIGHTNING.prefix + ".", "pytorch_lightning.", "lightning_fabric.")):
            return PYTORCH_LIGHTNING
        if module.startswith((PACKAGE + ".", "lightning.")):
            return LIGHTNING
    return None


def imported() -> list[Flavor]:
    return [flavor for flavor in FLAVORS if flavor.imported()]


def every_imported(dotted: str) -> tuple[Any, ...]:
    """That class (``"callbacks.Timer"``) in every imported flavour: for ``isinstance`` and hook comparisons.

    Checks use every imported flavour, not the strategy's own, because with both packages imported one strategy
    object may serve the other package's Trainer, module and callbacks.
    """
    found = []
    for flavor in imported():
        try:
            found.append(flavor.attribute(dotted))
        except (ImportError, AttributeError):  # the package is still being imported: it has no such object yet
            continue
    return tuple(found)


def preferred() -> Flavor:
    """The flavour ``lightning_pdasgd.PDASGDStrategy`` resolves to (see ``__init__.py``)."""
    if imported() == [PYTORCH_LIGHTNING]:
        return PYTORCH_LIGHTNING
    for flavor in FLAVORS:
        if flavor.installed():
            return flavor
    raise ModuleNotFoundError(
        "lightning-pdasgd needs Lightning: neither `lightning` nor `pytorch_lightning` is installed."
        " Install one of them, e.g. `pip install lightning` (or `pip install pytorch-lightning`)."
    )


# --------------------------------------------------------------------------------------------- registration
_lock = threading.RLock()
_registered: set[str] = set()  # flavours whose StrategyRegistry has "pdasgd"
_ready: set[str] = set()  # flavours whose copy of strategy.py has loaded and been made known to the others


def activate(flavor: Flavor) -> ModuleType:
    """Load our modules for ``flavor`` (its strategy and LightningCLI alias), register them; the strategy module."""
    strategy = flavor.ours("strategy")
    _copy_ready(flavor)
    return strategy


def _strategy_factory(flavor: Flavor) -> Callable[..., Any]:
    def pdasgd(**kwargs: Any) -> Any:
        """``PDASGDStrategy(**kwargs)`` of this flavour; registering a factory keeps registration import-free."""
        return activate(flavor).PDASGDStrategy(**kwargs)

    pdasgd.__qualname__ = f"pdasgd_for_{flavor.name}"
    return pdasgd


def _package_ready(flavor: Flavor) -> None:
    """``flavor`` has been imported: register "pdasgd" there, and load our copy unless that copy is importing it."""
    with _lock:
        registry = flavor.module("strategies").StrategyRegistry
        if STRATEGY_NAME not in registry:
            registry.register(STRATEGY_NAME, _strategy_factory(flavor), description=STRATEGY_DESCRIPTION)
        _registered.add(flavor.name)
        for other in FLAVORS:
            if other.name in _ready and other is not flavor:
                _accept_in(flavor, other)
    if f"{flavor.prefix}.integration._lightning" not in sys.modules:
        activate(flavor)
    # else: our copy's import of the package brought us here; its strategy module, once loaded, calls _copy_ready


def _copy_ready(flavor: Flavor) -> None:
    """Our strategy for ``flavor`` has loaded: import its CLI alias, let the other imported Trainer accept it."""
    with _lock:
        if flavor.name in _ready:
            return
        _ready.add(flavor.name)
    flavor.ours("cli_aliases")  # jsonargparse resolves `--trainer.strategy pdasgd` only to an imported class
    for other in FLAVORS:
        if other is not flavor and other.imported() and other.name in _registered:
            _accept_in(other, flavor)
            if other.name in _ready:
                _accept_in(flavor, other)


def _accept_in(trainer_flavor: Flavor, strategy_flavor: Flavor) -> None:
    """Make ``strategy_flavor``'s strategy (and launcher) pass ``trainer_flavor``'s ``isinstance`` checks."""
    strategy_flavor.ours("integration.one_process_per_device").make_acceptable_to(trainer_flavor)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs an action right after one of the watched modules has been executed (finds nothing itself).

    Lets ``import lightning_pdasgd`` come before ``import pytorch_lightning`` (isort's order) and still register
    ``strategy="pdasgd"``: Trainers read the registry at construction, always after that import has finished.
    """

    def __init__(self, actions: dict[str, Callable[[], None]]) -> None:
        self.actions = actions

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        action = self.actions.get(fullname)
        if action is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or isinstance(loader, type) or not hasattr(loader, "exec_module"):
            return spec
        execute = loader.exec_module

        def exec_module(module: ModuleType) -> None:  # set on this spec's own loader object only
            execute(module)
            loader.__dict__.pop("exec_module", None)
            try:
                action()
            except Exception as error:  # noqa: BLE001 - never break the user's import of Lightning
                warnings.warn(
                    f"lightning-pdasgd: could not register strategy='pdasgd' after importing {fullname}: "
                    f"{type(error).__name__}: {error}",
                    stacklevel=2,
                )

        loader.exec_module = exec_module
        return spec


def install() -> None:
    """Called once by ``import lightning_pdasgd``: register with the imported flavours, watch for the others."""
    actions: dict[str, Callable[[], None]] = {}
    for flavor in FLAVORS:
        actions[flavor.pytorch] = lambda flavor=flavor: _package_ready(flavor)
        actions[f"{flavor.pytorch}.cli"] = lambda flavor=flavor: activate(flavor)
        actions[f"{flavor.prefix}.strategy"] = lambda flavor=flavor: _copy_ready(flavor)
    if not any(isinstance(finder, _AfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(actions))
    for flavor in imported():
        _package_ready(flavor)


def inherited(dotted: str, member: str) -> tuple[Any, ...]:
    """``member`` of that base class in every imported flavour: a subclass's attribute that is one of these is not
    overridden (``checks.warn_gradient_hooks`` compared with ``lightning``'s only, so every hook of a
    ``pytorch_lightning`` module looked overridden)."""
    return tuple(getattr(base, member) for base in every_imported(dotted) if hasattr(base, member))
