"""Configuration errors of ``lightning-pdasgd`` in a few lines: the key, the value given, what is allowed.

Why: jsonargparse (under LightningCLI) prints about 50 lines of usage before an unknown-key error, and a value a
class rejects at construction (``backward_threads: 0``) surfaces as a 60-line traceback of jsonargparse internals
whose one useful line is near the end. Both messages are plain text (jsonargparse raises no structured error), so
this module reads the few patterns they are made of -- ``Parser key "..."``, ``Problem with given class_path``,
``Option '...' is not accepted``, ``Given value: ...``, ``Subtypes: [...]`` -- and falls back to the message's own
meaningful lines when it meets something else. ``JSONARGPARSE_DEBUG=1`` still gives the full error.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import inspect
import os
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, NoReturn, Optional

from lightning.pytorch.cli import LightningArgumentParser

DEBUG_ENV = "JSONARGPARSE_DEBUG"
MAX_LINES = 8

_PARSER_KEY = re.compile(r'Parser key "([^"]+)"')
_CLASS_PATH = re.compile(r"Problem with given class_path '([^']+)'")
_NOT_ACCEPTED = re.compile(r"Option '([^']+)' is not accepted")
_GIVEN_VALUE = re.compile(r"^\s*Given value: (.*)$", re.MULTILINE)
_NESTED_ARG = re.compile(r"^NestedArg\(key='([^']*)', val=(.*)\)$")
_SUBTYPES = re.compile(r"^\s*Subtypes: \[(.*)\]$", re.MULTILINE)
_UNRECOGNIZED = re.compile(r"unrecognized arguments: (.*)")
_SUBCOMMAND_OPTION = re.compile(r"does not accept option '([^']+)'")
_BACKTICKED = re.compile(r"`([A-Za-z_][A-Za-z0-9_]*)`")
_CLASS_TYPE = re.compile(r"<class '([^']+)'>")
_LITERAL = re.compile(r"Literal\[([^\]]*)\]")
_BOILERPLATE = (
    "Does not validate against any of the Union subtypes",
    "Subtypes:",
    "Errors:",
    "Given value type:",
    "Given value:",
    "Expected a <class 'str'>",
    "Expected a <class 'NoneType'>",
)



@dataclass
class Problem:
    """One configuration mistake, as the user should read it."""

    key: Optional[str]
    value: Optional[str]
    reason: str  # "unknown key", "invalid value" or a class's own message
    allowed: Optional[str] = None
    suggestion: Optional[str] = None
    details: list[str] = field(default_factory=list)

    def lines(self, prog: str) -> list[str]:
        head = f"{prog}: error: {self.reason}"
        if self.key is not None:
            head += f" `{self.key}`"
        if self.value is not None:
            head += f" = {self.value}"
        lines = [head, *(f"  {line}" for line in self.details)]
        if self.allowed:
            lines.append(f"  allowed: {self.allowed}")
        if self.suggestion:
            lines.append(f"  did you mean `{self.suggestion}`?")
        elif self.key is not None and self.reason != "unknown key":
            lines.append(f"  set `{self.key}` in the yaml config or with `--{self.key} VALUE`")
        lines.append(f"  `{prog} --help` lists every key; {DEBUG_ENV}=1 shows the full error")
        return _shorten(lines)


# ------------------------------------------------------------------------------------------------- parse errors
def parse_error_problem(message: str, option_names: Iterable[str] = ()) -> Problem:
    """What a jsonargparse parse error says, in the terms of ``Problem``.

    ``option_names`` are the parser's keys (``trainer.max_epochs``, ...), used to suggest a close one for an
    unknown key that is not inside a ``class_path`` (those get the class's own parameters instead).
    """
    unrecognized = _UNRECOGNIZED.search(message)
    if unrecognized:
        words = unrecognized.group(1).split()
        key = words[0].lstrip("-") if words else None
        value = " ".join(words[1:]) or None
        return Problem(key, value, "unknown key", suggestion=_closest(key, option_names))
    subcommand_option = _SUBCOMMAND_OPTION.search(message)
    if subcommand_option:
        key = subcommand_option.group(1)
        return Problem(key, None, "unknown key", suggestion=_closest(key, option_names))

    keys = _PARSER_KEY.findall(message)
    class_paths = _CLASS_PATH.findall(message)
    key = ".init_args.".join(keys) if keys else None
    value = None
    given = _GIVEN_VALUE.search(message)  # the innermost value comes first: nested errors are printed first
    if given:
        value = given.group(1).strip()
        nested = _NESTED_ARG.match(value)
        if nested:
            nested_key, value = nested.group(1), _unquote(nested.group(2).strip())
            if key is not None and not key.endswith(f".{nested_key}"):
                key = f"{key}.init_args.{nested_key}"
    not_accepted = _NOT_ACCEPTED.search(message)
    if not_accepted:
        name = not_accepted.group(1)
        if key is None or not key.endswith(name):
            key = f"{key}.init_args.{name}" if key else name
        if value is not None and value.startswith("{"):  # a yaml/json mapping: show only the unknown key's value
            value = _value_in_mapping(value, name)
        parameters = _init_parameters(class_paths[-1]) if class_paths else []
        allowed = f"{', '.join(parameters)} ({class_paths[-1]})" if parameters else None
        match = _closest(name, parameters)
        suggestion = f"{key.rsplit('.', 1)[0]}.{match}" if match else None
        return Problem(key, value, "unknown key", allowed=allowed, suggestion=suggestion)
    subtypes = _SUBTYPES.findall(message)
    if key is not None and subtypes:
        details = [line for line in _meaningful_lines(message) if not _is_expectation(line)]
        return Problem(key, value, "invalid value for", allowed=_readable_types(subtypes[-1]), details=details[:2])
    lines = _meaningful_lines(message)
    return Problem(None, None, lines[0] if lines else message.strip(), details=lines[1:4])


# ------------------------------------------------------------------------------------------------- build errors
def instantiation_problem(error: BaseException, config: Any) -> Problem:
    """A class rejected its arguments while LightningCLI built it: find the key and value in ``config``.

    The class's own message names the argument in backticks (``PDASGDStrategy: `backward_threads` must be ...``);
    the key is the config entry with that name under the ``class_path`` jsonargparse reports, and the value is what
    the config holds there.
    """
    message = str(error)
    reasons = [
        line[2:].strip() if line.startswith("- ") else line
        for line in _meaningful_lines(message)
        if not _is_expectation(line)
    ]
    reasons = reasons or [f"{type(error).__name__}: {message.strip()}"]
    flat = _flatten(config)
    class_path = None
    given = _GIVEN_VALUE.search(message)
    if given:
        match = re.search(r"class_path='([^']+)'", given.group(1))
        class_path = match.group(1) if match else None
    roots = [key[: -len(".class_path")] for key, value in flat.items() if key.endswith(".class_path")]
    if class_path is not None:
        roots = [root for root in roots if flat.get(f"{root}.class_path") == class_path] or roots
    for name in _BACKTICKED.findall(" ".join(reasons)):
        for root in roots:
            key = f"{root}.init_args.{name}"
            if key in flat:
                return Problem(key, yaml_spelling(flat[key]), "invalid value for", details=reasons[:3])
    if class_path is not None and roots:
        return Problem(roots[0], class_path, "cannot build", details=reasons[:3])
    return Problem(None, None, reasons[0], details=reasons[1:4])


# ------------------------------------------------------------------------------------------------- the parser
class ShortErrorParser(LightningArgumentParser):
    """A ``LightningArgumentParser`` whose errors are a few lines (key, value, what is allowed) instead of the
    usage text followed by the error. Pass it as ``LightningCLI(parser_class=ShortErrorParser)`` in any script."""

    def error(self, message: str, ex: Optional[Exception] = None) -> NoReturn:
        if not self.exit_on_error or os.environ.get(DEBUG_ENV, "").lower() in ("1", "true", "yes"):
            super().error(message, ex)  # nested parsers raise, and the caller reports; debug mode keeps it all
        parser = getattr(ex, "subcommand_parser", None) or self
        problem = parse_error_problem(message, option_names(parser, self))
        prog = parser.prog.replace(" [options]", "")
        sys.stderr.write("\n".join(problem.lines(prog)) + "\n")
        self.exit(2)


def option_names(*parsers: Any) -> list[str]:
    """The dotted keys (``trainer.max_epochs``) of these parsers and their subcommands', for suggestions."""
    names: list[str] = []
    pending = list(parsers)
    seen: set[int] = set()
    while pending:
        parser = pending.pop()
        if id(parser) in seen:
            continue
        seen.add(id(parser))
        for action in getattr(parser, "_actions", []):  # argparse keeps its actions here
            names.extend(option.lstrip("-") for option in action.option_strings if option.startswith("--"))
            choices = getattr(action, "choices", None)
            if isinstance(choices, dict):  # the subcommands' parsers
                pending.extend(choice for choice in choices.values() if hasattr(choice, "_actions"))
    return names


# ------------------------------------------------------------------------------------------------- helpers
def _meaningful_lines(message: str) -> list[str]:
    lines = []
    for raw in message.splitlines():
        line = raw.strip()
        if not line or any(line.startswith((prefix, f"- {prefix}")) for prefix in _BOILERPLATE):
            continue
        if _PARSER_KEY.match(line) or _CLASS_PATH.search(line):
            continue
        lines.append(line)
    return lines


def _is_expectation(line: str) -> bool:
    """jsonargparse's per-subtype "Expected a <class 'int'>" lines: replaced by the one ``allowed`` line."""
    return line.lstrip("- ").startswith("Expected a ")


def _readable_types(subtypes: str) -> str:
    """``<class 'int'>, typing.Literal['auto']`` -> ``an int or 'auto'``."""
    parts: list[str] = []
    for literal in _LITERAL.findall(subtypes):
        parts.extend(value.strip() for value in literal.split(","))
    for name in _CLASS_TYPE.findall(subtypes):
        short = name.rsplit(".", 1)[-1]
        if short == "NoneType":
            parts.append("null")
        else:
            parts.append(f"{'an' if short[0] in 'aeiouAEIOU' else 'a'} {short}")
    return " or ".join(parts) if parts else subtypes


def _init_parameters(class_path: str) -> list[str]:
    """The keyword arguments a class accepts, in signature order (empty when it cannot be imported)."""
    module_name, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
        parameters = inspect.signature(cls.__init__).parameters.values()
    except (ImportError, AttributeError, TypeError, ValueError):
        return []
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [parameter.name for parameter in parameters if parameter.kind in kinds and parameter.name != "self"]


def _unquote(text: str) -> str:
    """``'true'`` (a NestedArg's repr of what was typed) -> ``true``, as the user typed it."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
    return value if isinstance(value, str) else text


def _value_in_mapping(text: str, name: str) -> Optional[str]:
    """The value of ``name`` (directly or under ``init_args``) in the repr of a mapping, yaml-spelled."""
    try:
        mapping = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return None
    for scope in (mapping, mapping.get("init_args") if isinstance(mapping, dict) else None):
        if isinstance(scope, dict) and name in scope:
            return yaml_spelling(scope[name])
    return None


def yaml_spelling(value: Any) -> str:
    """``True`` -> ``true``, ``None`` -> ``null``, ``'skipp'`` -> ``'skipp'``: values as a config would hold them."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    return repr(value)


def _closest(name: Optional[str], candidates: Iterable[str]) -> Optional[str]:
    if not name:
        return None
    matches = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.75)
    return matches[0] if matches else None


def _flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """``{"trainer.strategy.init_args.backward_threads": 0, ...}`` from a jsonargparse Namespace or dict."""
    items = config.items() if hasattr(config, "items") else ()
    flat: dict[str, Any] = {}
    for key, value in items:
        path = f"{prefix}{key}"
        if hasattr(value, "items"):
            flat.update(_flatten(value, f"{path}."))
        else:
            flat[path] = value
    return flat


def _shorten(lines: list[str]) -> list[str]:
    """At most ``MAX_LINES`` lines of at most 400 characters: an error is read, not scrolled."""
    clipped = [line if len(line) <= 400 else f"{line[:397]}..." for line in lines]
    return clipped[:MAX_LINES]
