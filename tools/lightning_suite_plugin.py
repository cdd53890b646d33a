"""pytest plugin used by ``tools/lightning_suite.py``: run Lightning's own tests with ``strategy="pdasgd"`` injected.

Loaded with ``-p lightning_suite_plugin`` (this folder on ``PYTHONPATH``) and configured by environment variables:

- ``PDASGD_SUITE_RESULTS``: a JSON-lines file this plugin appends to: the collected test ids, then one ``start`` and
  one ``finish`` record per test (outcome, first error line per phase, innermost ``lightning_pdasgd`` frame, Trainers
  injected, ``pdasgd-`` threads left alive). Written as the run goes, so a dead process loses nothing finished.
- ``PDASGD_SUITE_INJECT``: ``1`` (default) wraps ``Trainer.__init__`` of ``lightning.pytorch`` (and of
  ``pytorch_lightning`` once a test has imported it) so that every single-device CPU Trainer whose strategy is
  ``"auto"`` (passed or defaulted, ``PL_TRAINER_*`` environment defaults included) gets ``strategy="pdasgd"``.
  Trainers with another strategy, several devices or nodes, or a non-CPU accelerator (``"auto"`` resolved the way
  Lightning resolves it, so mocked CUDA/MPS/XLA counts are respected) are left alone. ``0``: plain Lightning;
  ``lightning_pdasgd`` is then not even imported.
- ``PDASGD_SUITE_SELECT``: optional file of test ids, one a line; every other collected test is deselected.

Independently of Lightning's own ``thread_police`` fixture, each test's ``pdasgd-`` threads still alive after all its
fixtures are torn down are recorded (with whether they were still alive after a 2 s grace period).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Generator, Iterable
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

ENV_RESULTS = "PDASGD_SUITE_RESULTS"
ENV_INJECT = "PDASGD_SUITE_INJECT"
ENV_SELECT = "PDASGD_SUITE_SELECT"
ENV_STRATEGY_KWARGS = "PDASGD_SUITE_STRATEGY_KWARGS"
THREAD_PREFIX = "pdasgd-"
LEAK_GRACE_S = 2.0
TRAINER_PACKAGES = ("lightning.pytorch", "pytorch_lightning")
MESSAGE_LIMIT = 2000
_PATCHED = "_pdasgd_suite_wrapped"


def _package_dir() -> str | None:
    """``lightning_pdasgd``'s folder, found without importing it (the plain run must not import it)."""
    spec = importlib.util.find_spec("lightning_pdasgd")
    if spec is None or spec.origin is None:
        return None
    return str(Path(spec.origin).resolve().parent) + os.sep


PACKAGE_DIR = _package_dir()


class _TestState:
    """What the plugin learns about the test that runs now."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.injected = 0  # Trainers given strategy="pdasgd"
        self.left_alone = 0  # Trainers built as the test asked
        self.threads_before: set[int | None] = set()
        self.phases: dict[str, dict[str, Any]] = {}
        self.errors: dict[str, dict[str, Any]] = {}
        self.leaks: list[dict[str, Any]] = []
        self.rerun = False  # this attempt failed and pytest-rerunfailures runs the test again
        self.started = time.time()


STATE = _TestState()


# ----------------------------------------------------------------------------------------------------- injection


def _inject_enabled() -> bool:
    return os.environ.get(ENV_INJECT, "1") != "0"


def _effective_arguments(package: str, cls: type, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The Trainer's arguments as Lightning will see them: ``PL_TRAINER_*`` environment defaults, then ``kwargs``."""
    try:
        argparse = importlib.import_module(f"{package}.utilities.argparse")
        env = vars(argparse._parse_env_variables(cls))
    except Exception:  # a Trainer subclass with an unusual signature: no environment defaults
        env = {}
    return {**env, **kwargs}


def _resolves_to_cpu(package: str, accelerator: Any) -> bool:
    """Whether ``accelerator`` means the CPU, resolving ``"auto"`` with Lightning's own (mockable) availability."""
    if isinstance(accelerator, str):
        if accelerator == "auto":
            connector = importlib.import_module(f"{package}.trainer.connectors.accelerator_connector")
            try:
                accelerator = connector._AcceleratorConnector._choose_auto_accelerator()
            except Exception:
                return False
        return accelerator == "cpu"
    accelerators = importlib.import_module(f"{package}.accelerators")
    return isinstance(accelerator, accelerators.CPUAccelerator)


def wants_pdasgd(package: str, cls: type, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether this Trainer is a single-device CPU Trainer with ``strategy="auto"``."""
    if args:  # the Trainer takes keyword arguments only; leave anything unusual alone
        return False
    arguments = _effective_arguments(package, cls, kwargs)
    strategy = arguments.get("strategy", "auto")
    if not isinstance(strategy, str) or strategy != "auto":
        return False
    if arguments.get("num_nodes", 1) not in (1, "1"):
        return False
    devices = arguments.get("devices", "auto")
    if not isinstance(devices, (int, str)) or devices not in ("auto", 1, "1"):
        return False
    return _resolves_to_cpu(package, arguments.get("accelerator", "auto"))


def injected_strategy(package: str) -> Any:
    """``"pdasgd"``, or with ``PDASGD_SUITE_STRATEGY_KWARGS`` (JSON) a ``PDASGDStrategy`` with those settings, e.g.
    ``{"metrics": "off"}`` to see which failures a setting removes."""
    settings = os.environ.get(ENV_STRATEGY_KWARGS)
    if not settings:
        return "pdasgd"
    flavour = "lightning_pdasgd" if package == "lightning.pytorch" else "lightning_pdasgd.pl"
    return importlib.import_module(flavour).PDASGDStrategy(**json.loads(settings))


def _wrap_trainer(package: str) -> None:
    """Wrap ``<package>.Trainer.__init__`` once (``functools.wraps`` keeps its signature for argparse/CLI tests)."""
    module = sys.modules.get(package)
    trainer = getattr(module, "Trainer", None) if module is not None else None
    if trainer is None or getattr(trainer.__init__, _PATCHED, False):
        return
    original: Callable[..., None] = trainer.__init__

    @functools.wraps(original)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        if wants_pdasgd(package, type(self), args, kwargs):
            kwargs["strategy"] = injected_strategy(package)
            STATE.injected += 1
        else:
            STATE.left_alone += 1
        original(self, *args, **kwargs)

    setattr(__init__, _PATCHED, True)
    trainer.__init__ = __init__


def _wrap_imported_trainers() -> None:
    for package in TRAINER_PACKAGES:
        if package in sys.modules:
            _wrap_trainer(package)


# ----------------------------------------------------------------------------------------------------- records


def _write(record: dict[str, Any]) -> None:
    path = os.environ.get(ENV_RESULTS)
    if not path:
        return
    with open(path, "a", encoding="utf-8") as stream:
        stream.write(json.dumps(record, default=str) + "\n")
        stream.flush()


def _is_ours(filename: str) -> bool:
    return PACKAGE_DIR is not None and os.path.abspath(filename).startswith(PACKAGE_DIR)


def _frame_text(tb: TracebackType) -> str:
    code = tb.tb_frame.f_code
    filename = os.path.abspath(code.co_filename)
    if _is_ours(filename) and PACKAGE_DIR is not None:
        filename = "lightning_pdasgd/" + filename[len(PACKAGE_DIR) :]
    return f"{filename}:{tb.tb_lineno} in {code.co_name}"


def _frames(tb: TracebackType | None) -> list[TracebackType]:
    frames = []
    while tb is not None:
        frames.append(tb)
        tb = tb.tb_next
    return frames


def _chain(error: BaseException) -> Iterable[BaseException]:
    """The error, then its causes and contexts (what ``raise ... from`` and ``except`` attached)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def first_line(text: str) -> str:
    stripped = text.strip()
    return stripped.splitlines()[0] if stripped else ""


def describe_error(error: BaseException) -> dict[str, Any]:
    """Type, first line, where it was raised, and the innermost ``lightning_pdasgd`` frame (its own, else a cause's)."""
    message = str(error)
    line = first_line(message)
    type_name = type(error).__qualname__
    frames = _frames(error.__traceback__)
    ours_in_traceback = [tb for tb in frames if _is_ours(tb.tb_frame.f_code.co_filename)]
    innermost_ours = _frame_text(ours_in_traceback[-1]) if ours_in_traceback else None
    ours_via = "traceback" if innermost_ours else None
    if innermost_ours is None:
        for cause in list(_chain(error))[1:]:
            ours = [tb for tb in _frames(cause.__traceback__) if _is_ours(tb.tb_frame.f_code.co_filename)]
            if ours:
                innermost_ours, ours_via = _frame_text(ours[-1]), f"cause {type(cause).__qualname__}"
                break
    return {
        "type": type_name,
        "type_module": type(error).__module__,
        "line": f"{type_name}: {line}" if line else type_name,
        "message": message[:MESSAGE_LIMIT],
        "raised_at": _frame_text(frames[-1]) if frames else None,
        "raised_in_ours": bool(frames) and _is_ours(frames[-1].tb_frame.f_code.co_filename),
        "ours": innermost_ours,
        "ours_via": ours_via,
        "timeout": type_name == "Failed" and "from pytest-timeout" in message,
    }


# ----------------------------------------------------------------------------------------------------- hooks


def pytest_configure(config: pytest.Config) -> None:
    if _inject_enabled():
        import lightning_pdasgd  # noqa: F401  (registers strategy="pdasgd")

        importlib.import_module("lightning.pytorch")
        _wrap_imported_trainers()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    select_path = os.environ.get(ENV_SELECT)
    if not select_path:
        return
    wanted = set(Path(select_path).read_text(encoding="utf-8").splitlines())
    kept = [item for item in items if item.nodeid in wanted]
    dropped = [item for item in items if item.nodeid not in wanted]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    items[:] = kept


def pytest_collection_finish(session: pytest.Session) -> None:
    _write({"event": "collected", "nodeids": [item.nodeid for item in session.items], "time": time.time()})


def pytest_runtest_logstart(nodeid: str, location: tuple[str, int | None, str]) -> None:
    STATE.reset()
    if _inject_enabled():
        _wrap_imported_trainers()
    _write({"event": "start", "nodeid": nodeid, "time": STATE.started})


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    if _inject_enabled():
        _wrap_imported_trainers()  # a test module may have imported pytorch_lightning at collection
    STATE.threads_before = {thread.ident for thread in threading.enumerate()}


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None, None, None]:
    try:
        return (yield)
    finally:
        _check_threads()


def _check_threads() -> None:
    """Record the ``pdasgd-`` threads this test started that are alive after all of its fixtures are torn down."""
    leaked = [
        thread
        for thread in threading.enumerate()
        if thread.name.startswith(THREAD_PREFIX) and thread.is_alive() and thread.ident not in STATE.threads_before
    ]
    deadline = time.monotonic() + LEAK_GRACE_S
    for thread in leaked:
        thread.join(timeout=max(0.0, deadline - time.monotonic()))
    STATE.leaks.extend(
        {"name": thread.name, "daemon": thread.daemon, "alive_after_grace": thread.is_alive()} for thread in leaked
    )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, Any]:
    report = yield
    if report.failed:
        if call.excinfo is not None:
            STATE.errors[call.when] = describe_error(call.excinfo.value)
        else:  # e.g. a strict XPASS: no exception, only a text
            line = first_line(report.longreprtext) or "failed without an exception"
            STATE.errors[call.when] = {"type": None, "line": line, "message": report.longreprtext[:MESSAGE_LIMIT]}
    return report


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.outcome == "rerun":  # pytest-rerunfailures (Lightning's `flaky` marker): another attempt follows
        STATE.rerun = True
    STATE.phases[report.when] = {
        "outcome": report.outcome,
        "xfail": hasattr(report, "wasxfail"),
        "duration": report.duration,
    }


def _outcome(phases: dict[str, dict[str, Any]]) -> str:
    setup, call, teardown = (phases.get(when, {}) for when in ("setup", "call", "teardown"))
    if setup.get("outcome") == "failed":
        return "error"
    if call.get("outcome") == "failed":
        return "failed"
    if teardown.get("outcome") == "failed":
        return "error"
    for phase in (setup, call):
        if phase.get("outcome") == "skipped":
            return "xfailed" if phase.get("xfail") else "skipped"
    if call.get("outcome") == "passed":
        return "xpassed" if call.get("xfail") else "passed"
    return "unknown"


def pytest_runtest_logfinish(nodeid: str, location: tuple[str, int | None, str]) -> None:
    _write(
        {
            "event": "finish",
            "nodeid": nodeid,
            "outcome": "rerun" if STATE.rerun else _outcome(STATE.phases),
            "duration": round(time.time() - STATE.started, 3),
            "injected": STATE.injected,
            "left_alone": STATE.left_alone,
            "errors": STATE.errors,
            "leaked_threads": STATE.leaks,
            "time": time.time(),
        }
    )
