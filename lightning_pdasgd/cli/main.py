"""The ``lightning-pdasgd`` command: Lightning's CLI with ``strategy="pdasgd"`` preset, plus ``report``.

Run it from the repository root (or any folder whose Python modules the config names)::

    lightning-pdasgd fit --config examples/configs/digits_cli.yaml
    lightning-pdasgd fit --config examples/configs/digits_cli.yaml --trainer.strategy.init_args.backward_threads 3
    lightning-pdasgd fit --print_config                         # every argument with its default, as yaml
    lightning-pdasgd fit --trainer.strategy.help PDASGDStrategy # the strategy's arguments with help and defaults
    lightning-pdasgd report lightning_logs/digits --out report  # PNG plots of a run (CSVLogger or TensorBoard)
    lightning-pdasgd report lightning_logs/digits --baseline lightning_logs/plain  # ... beside a baseline run
    python -m lightning_pdasgd ...                              # the same, without the console script

Why a command of its own: a yaml file names its model and datamodule by ``class_path``, so any LightningModule
trains under PD-ASGD without a script. The current working directory is put on ``sys.path`` first (as
``python -m`` does), so ``class_path: examples.digits.DigitsClassifier`` resolves when run from the repository root.
A wrong key or value is reported in a few lines naming the key, the value and what is allowed (``cli/errors.py``),
and ``--trainer.strategy pdasgd`` takes arguments (``cli_aliases.py``).
"""

from __future__ import annotations

import os
import sys
from typing import Any, Optional

from lightning.pytorch.cli import LightningCLI

import lightning_pdasgd  # noqa: F401 - registers strategy="pdasgd"
from lightning_pdasgd import cli_aliases  # noqa: F401 - `--trainer.strategy pdasgd --trainer.strategy.<arg> V`
from lightning_pdasgd.cli.errors import ShortErrorParser, instantiation_problem
from lightning_pdasgd.errors import ConfigurationError

PROG = "lightning-pdasgd"
REPORT_COMMAND = "report"
# a class_path default (not the "pdasgd" name) makes --print_config list the strategy's init_args with defaults
DEFAULT_STRATEGY: dict[str, Any] = {"class_path": "lightning_pdasgd.PDASGDStrategy"}
DESCRIPTION = (
    "Lightning's CLI with the PD-ASGD strategy (lightning_pdasgd.PDASGDStrategy) as the default. Pick the model and"
    " the datamodule by class_path in a yaml config; modules in the current directory are importable, so run the"
    " repository's examples from its root. The strategy's arguments, with help and defaults:"
    " `lightning-pdasgd fit --trainer.strategy.help PDASGDStrategy`. Also: `lightning-pdasgd report LOG_DIR"
    " [--out DIR] [--baseline LOG_DIR]` plots a run's CSVLogger or TensorBoard logs."
)


def main(args: Optional[list[str]] = None) -> int:
    """Entry point of ``lightning-pdasgd`` and ``python -m lightning_pdasgd``; returns the exit code.

    ``report`` is dispatched before LightningCLI sees the arguments, because LightningCLI only knows the Trainer's
    subcommands (``fit``, ``validate``, ``test``, ``predict``).
    """
    argv = sys.argv[1:] if args is None else list(args)
    if argv and argv[0] == REPORT_COMMAND:
        from lightning_pdasgd.cli import report

        return report.main(argv[1:], prog=f"{PROG} {REPORT_COMMAND}")
    try:
        cli = run_cli(None if args is None else argv)
    except ConfigurationError as error:
        print(error, file=sys.stderr)
        return 2
    print_final_accuracy(cli)
    return 0


class PDASGDCLI(LightningCLI):
    """LightningCLI whose configuration errors are a few lines naming the key, the value and what is allowed.

    Parse errors (unknown key, wrong type) go through ``ShortErrorParser``; a value that a class rejects when it is
    built (``backward_threads: 0``) is raised by jsonargparse as a long chained error, turned here into a
    ``ConfigurationError`` whose message is the short form (the original stays its ``__cause__``).
    """

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ValueError, TypeError) as error:
            if os.environ.get("JSONARGPARSE_DEBUG"):
                raise
            config = self.config.get(self.subcommand) if self.subcommand else self.config
            prog = f"{PROG} {self.subcommand}" if self.subcommand else PROG
            problem = instantiation_problem(error, config)
            raise ConfigurationError("\n".join(problem.lines(prog))) from error


def run_cli(args: Optional[list[str]] = None) -> LightningCLI:
    """Parse ``args`` (``sys.argv[1:]`` when ``None``), build the classes and run the subcommand."""
    add_working_directory_to_path()
    return PDASGDCLI(
        model_class=None,
        datamodule_class=None,
        subclass_mode_model=True,
        subclass_mode_data=True,
        trainer_defaults={"strategy": dict(DEFAULT_STRATEGY)},
        save_config_kwargs={"overwrite": True},
        parser_class=ShortErrorParser,
        parser_kwargs={"prog": PROG, "description": DESCRIPTION},
        args=args,
    )


def add_working_directory_to_path() -> None:
    """Make modules in the current directory importable by ``class_path``, as ``python -m`` would.

    A console script's ``sys.path[0]`` is the folder of the script (the environment's ``bin``), not the folder the
    user is in, so ``examples.digits.DigitsClassifier`` would not resolve from the repository root without this.
    """
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)


def print_final_accuracy(cli: LightningCLI) -> None:
    """After ``fit``, print the last ``val_acc`` the run logged (nothing when the model logs no ``val_acc``)."""
    if cli.subcommand != "fit":
        return
    accuracy = cli.trainer.callback_metrics.get("val_acc")
    if accuracy is not None and cli.trainer.is_global_zero:
        print(f"final validation accuracy: {float(accuracy):.4f}")
