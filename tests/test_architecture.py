"""The package's layering, read from its source: which module may import which, no import circle, small modules.

Layers, lowest first (``lightning_pdasgd/DESIGN.md``): ``errors`` and ``_flavor``; ``engine/`` (Lightning-free, one
rank); ``distributed/`` and ``config``; the Lightning integration (``integration/`` and the public modules loaded
once per Lightning package); the command line (``cli/``). A module imports only from its own layer or below;
imports under ``if TYPE_CHECKING:`` are annotations, not dependencies. Every import counts, also one inside a
function (that is how circles hide).
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_pdasgd"

LAYERS = {
    "errors": 0,
    "_flavor": 0,
    "engine": 1,
    "distributed": 2,
    "fault_tolerance": 2,  # torchft: Lightning-free like distributed/ (its Lightning side is integration/fault_tolerant_fit.py)
    "config": 2,
    "integration": 3,
    "strategy": 3,
    "callbacks": 3,
    "straggler": 3,
    "cli_aliases": 3,
    "compensation": 3,  # the 0.1 import path of engine/compensation.py's public classes
    "cli": 4,
    "cli_errors": 4,  # the 0.1 import path of cli/errors.py's ShortErrorParser
    "__init__": 5,
    "__main__": 5,
}


def _modules() -> dict[str, Path]:
    """Dotted names (relative to the package) of every module, the ``pl`` alias package left out."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[0] == "pl":
            continue
        name = ".".join(parts[:-1]) if parts[-1] == "__init__" and len(parts) > 1 else ".".join(parts)
        found[name] = path
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(name: str, path: Path, modules: set[str]) -> set[str]:
    """The package's modules that ``name`` imports at run time (absolute and relative, anywhere in the file)."""
    tree = ast.parse(path.read_text())
    is_package = path.name == "__init__.py"
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_type_checking(node):
            skipped.update(id(child) for stmt in node.body for child in ast.walk(stmt))
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                stem = ".".join([*base, node.module] if node.module else base)
                prefix = f"lightning_pdasgd.{stem}" if stem else "lightning_pdasgd"
            else:
                prefix = node.module or ""
            targets = [prefix, *(f"{prefix}.{alias.name}" for alias in node.names)]
        for target in targets:
            if not target.startswith("lightning_pdasgd."):
                continue
            dotted = target.removeprefix("lightning_pdasgd.")
            if dotted in modules and dotted != name:
                found.add(dotted)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def _layer(module: str) -> int:
    return LAYERS[module.split(".")[0]]


def test_every_module_has_a_layer() -> None:
    """A new top-level module or folder must be placed in a layer (and in DESIGN.md's map) before it lands."""
    assert {name.split(".")[0] for name in _modules()} <= set(LAYERS)


def test_no_module_imports_from_a_higher_layer() -> None:
    """The engine never imports the exchange or Lightning's integration; they hand it what it needs."""
    upward = [
        f"{module} -> {imported}"
        for module, imports in _graph().items()
        for imported in imports
        if _layer(imported) > _layer(module)
    ]
    assert not upward, upward


def test_no_import_circle() -> None:
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for imported in sorted(graph[module]):
            if state.get(imported) == 1:
                circle = path[path.index(imported):] + [imported]
                pytest.fail("import circle: " + " -> ".join(circle))
            if imported not in state:
                visit(imported)
        path.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)


def test_the_engine_imports_no_lightning_package() -> None:
    """``engine/`` and ``distributed/`` are Lightning-free: usable and testable without a Trainer."""
    offenders = []
    for name, path in _modules().items():
        if _layer(name) > 2 or name == "config":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            offenders += [f"{name}: {n}" for n in names if n.split(".")[0] in ("lightning", "pytorch_lightning",
                                                                              "lightning_fabric")]
    assert not offenders, offenders


def test_modules_stay_small() -> None:
    sizes = {name: len(path.read_text().splitlines()) for name, path in _modules().items()}
    assert all(lines <= 400 for lines in sizes.values()), {n: lines for n, lines in sizes.items() if lines > 400}
    assert sizes["strategy"] <= 350, sizes["strategy"]


@pytest.mark.parametrize(
    "class_path",
    [
        "lightning_pdasgd.PDASGDStrategy",
        "lightning_pdasgd.strategy.PDASGDStrategy",
        "lightning_pdasgd.cli_aliases.pdasgd",
        "lightning_pdasgd.callbacks.EngineDrain",
        "lightning_pdasgd.straggler.Straggler",
        "lightning_pdasgd.compensation.DelayCompensation",
        "lightning_pdasgd.cli_errors.ShortErrorParser",
        "lightning_pdasgd.pl.PDASGDStrategy",
        "lightning_pdasgd.pl.strategy.PDASGDStrategy",
        "lightning_pdasgd.pl.cli_aliases.pdasgd",
        "lightning_pdasgd.pl.callbacks.EngineDrain",
        "lightning_pdasgd.pl.straggler.Straggler",
    ],
)
def test_class_paths_a_saved_config_of_the_previous_release_can_hold_still_import(class_path: str) -> None:
    """``config.yaml`` files saved by LightningCLI name classes by their module path; moving a module must not
    break them, in either Lightning package (``pl`` paths are the ``pytorch_lightning`` classes)."""
    module, _, name = class_path.rpartition(".")
    loaded = getattr(importlib.import_module(module), name)
    assert isinstance(loaded, type)
    expected_package = "pytorch_lightning" if ".pl." in class_path + "." else "lightning"
    if name != "DelayCompensation":
        lightning_bases = {base.__module__.split(".")[0] for base in loaded.__mro__} - {"lightning_pdasgd", "builtins"}
        assert expected_package in lightning_bases or (
            expected_package == "lightning" and "lightning" in lightning_bases
        ), (class_path, lightning_bases)
