"""Run a checkout of Lightning's own test suite with ``strategy="pdasgd"`` injected, and classify what fails.

Issue #24. Lightning's tests stay outside this repository: check a release out into /tmp, e.g.::

    mkdir -p /tmp/lightning-src && git --git-dir=/work/.mirror/Lightning-AI+pytorch-lightning/repo \\
        archive 2.6.5 tests src/version.info pyproject.toml | tar -x -C /tmp/lightning-src
    nice -n 10 python tools/lightning_suite.py /tmp/lightning-src /tmp/lightning-suite-out

(``pyproject.toml`` carries Lightning's pytest settings; its tests need ``pytest-timeout`` and ``pytest-rerunfailures``
for the ``flaky`` marker.) Steps:

1. ``pytest`` on ``tests/tests_pytorch/{callbacks,checkpointing,trainer/flags,trainer/optimization,tuner,loops}``
   (legacy-checkpoint tests ignored: they need downloaded data), run from ``tests/tests_pytorch`` as Lightning's CI
   does, with ``-p lightning_suite_plugin`` (this folder), which gives every single-device CPU ``Trainer`` with
   ``strategy="auto"`` ``strategy="pdasgd"``, records every test and the ``pdasgd-`` threads alive after it, with
   ``--timeout`` per test. A pytest process that dies or stops making progress (the watchdog) is restarted on the
   tests it had not run; the test it was in is recorded as a crash or hang.
2. Every test that failed, errored or leaked a thread again with plain Lightning (injection off, ``lightning_pdasgd``
   not imported).
3. Each of them classified (first match wins):

   - ``hang``: timed out (pytest-timeout or the watchdog) with PD-ASGD and passed plain;
   - ``leaked thread``: a ``pdasgd-`` thread alive after the test's teardown;
   - ``fails with plain too``: failed plain as well (environment, version skew between tests and installed package);
   - ``refused``: our setup-time refusal: a ``MisconfigurationException`` (or ``ValueError``/``TypeError``) whose
     message starts with "PD-ASGD"/"PDASGDStrategy" or that was raised in ``lightning_pdasgd`` (some refusals start
     with the setting, e.g. "`configure_optimizers` returned multiple optimizers"), also when the test's
     ``pytest.raises(match=...)`` caught it instead of the error it expects; grouped by the setting named;
   - ``crash``: any other exception (not an assertion) raised in, or passing through, a ``lightning_pdasgd`` frame,
     or a pytest process that died in the test;
   - ``semantic difference``: the rest: assertion failures (hook orders, logged keys, progress bar text, ...) and
     errors raised outside our frames (``kind`` says which).

Output in OUT_DIR: ``results.json`` (every failing test: id, class, first error line, innermost ``lightning_pdasgd``
frame, plain outcome), ``results.md`` (counts, lists, refusals by setting), the raw ``pdasgd.jsonl``/``plain.jsonl``
and the pytest logs. ``--markdown-into FILE`` also writes the Markdown between ``<!-- lightning-suite:begin -->`` and
``<!-- lightning-suite:end -->`` in FILE (appended with the markers when they are absent).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

TOOLS_DIR = Path(__file__).resolve().parent
PLUGIN = "lightning_suite_plugin"
SCOPE = ("callbacks", "checkpointing", "trainer/flags", "trainer/optimization", "tuner", "loops")
IGNORED = ("checkpointing/test_legacy_checkpoints.py",)
FAILING = ("failed", "error", "died", "hang")
CLASSES = ("refused", "fails with plain too", "crash", "hang", "leaked thread", "semantic difference")
MAX_RESTARTS = 25
WATCHDOG_MARGIN_S = 150  # beyond the per-test timeout: how long a pytest process may go without writing a record
BEGIN_MARK, END_MARK = "<!-- lightning-suite:begin -->", "<!-- lightning-suite:end -->"
OUR_PREFIXES = ("PD-ASGD", "PDASGDStrategy")
# setting errors; our runtime errors ("PD-ASGD: training diverged ...") are RuntimeErrors and count as crashes
REFUSAL_TYPES = ("MisconfigurationException", "ValueError", "TypeError", "ConfigurationError")

# (pattern in the refusal's message, the setting it names); the first match wins, so specific before general
REFUSAL_SETTINGS: tuple[tuple[str, str], ...] = (
    (r"multiple optimizers|exactly one optimizer|several optimizers", "several optimizers"),
    (r"automatic_optimization = False|manual optimization\W+but|\(manual optimization\)", "manual optimization"),
    (r"returned None", "no optimizer (configure_optimizers returns None)"),
    (r"no parameter that requires grad", "optimizer without trainable parameters"),
    (r"LBFGS|closure", "closure optimizer (LBFGS)"),
    (r"GradientAccumulationScheduler", "GradientAccumulationScheduler"),
    (r"accumulate_grad_batches", "accumulate_grad_batches"),
    (r"gradient_clip_algorithm|gradient_clip_val", "gradient_clip_algorithm='norm'"),
    (r"GradScaler", "precision with a GradScaler"),
    (r"on_before_optimizer_step", "on_before_optimizer_step override"),
    (r"on_after_backward", "on_after_backward override"),
    (r"configure_gradient_clipping", "configure_gradient_clipping override"),
    (r"max_time", "max_time"),
    (r"val_check_interval|check_val_every_n_epoch", "val_check_interval"),
    (r"every_n_train_steps|train_time_interval", "ModelCheckpoint mid-epoch saving"),
    (r"dataloader", "training dataloader"),
)


@dataclass
class Failure:
    """One failing test and why."""

    test: str
    cls: str
    error: str  # first line of the error
    ours: str | None  # innermost lightning_pdasgd frame
    phase: str | None = None
    setting: str | None = None  # refusals: the setting named
    kind: str | None = None  # semantic differences: "assertion" or the exception type
    raised_at: str | None = None
    plain: str | None = None  # plain Lightning's outcome, and its first error line when it failed
    leaked_threads: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------------- running


def _read_records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a killed process
            continue
    return records


def _pytest_command(scope: list[str], timeout: int) -> list[str]:
    return [
        sys.executable, "-m", "pytest", *scope, *(f"--ignore={path}" for path in IGNORED),
        "-p", "no:cacheprovider", "-p", PLUGIN, f"--timeout={timeout}", "--timeout-method=signal",
        "-q", "--color=no", "-rN",
    ]  # fmt: skip


def _run_pytest_once(
    tests_dir: Path, command: list[str], env: dict[str, str], log: Path, results: Path, watchdog_s: int
) -> tuple[int, bool]:
    """One pytest process; killed (with its process group) when ``results`` has not grown for ``watchdog_s``."""
    with log.open("a", encoding="utf-8") as stream:
        stream.write(f"\n$ (cd {tests_dir} && {' '.join(command)})\n")
        stream.flush()
        process = subprocess.Popen(
            command, cwd=tests_dir, env=env, stdout=stream, stderr=subprocess.STDOUT, start_new_session=True
        )
        last_size, last_change = -1, time.monotonic()
        while process.poll() is None:
            time.sleep(5)
            size = results.stat().st_size if results.exists() else 0
            if size != last_size:
                last_size, last_change = size, time.monotonic()
            elif time.monotonic() - last_change > watchdog_s:
                os.killpg(process.pid, signal.SIGKILL)  # our own child's process group
                process.wait()
                stream.write(f"\n[lightning_suite] no progress for {watchdog_s} s: killed pytest {process.pid}\n")
                return process.returncode, True
    return process.returncode, False


def run_suite(
    src: Path, out: Path, mode: str, selection: list[str] | None, scope: list[str], timeout: int
) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Run pytest (``mode`` "pdasgd" or "plain") until every selected test ran; the last record of each test."""
    tests_dir = src / "tests" / "tests_pytorch"
    results, log = out / f"{mode}.jsonl", out / f"pytest-{mode}.log"
    for path in (results, log):
        path.unlink(missing_ok=True)
    env = {key: value for key, value in os.environ.items() if key != "PYTEST_ADDOPTS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TOOLS_DIR), os.environ.get("PYTHONPATH")]))
    env["PDASGD_SUITE_RESULTS"] = str(results)
    env["PDASGD_SUITE_INJECT"] = "1" if mode == "pdasgd" else "0"
    universe: list[str] | None = None
    synthetic: set[str] = set()  # tests a dead or killed process was in
    remaining = selection
    done_before: set[str] = set()
    for _attempt in range(MAX_RESTARTS):
        if remaining is not None:
            select = out / f"select-{mode}.txt"
            select.write_text("\n".join(remaining) + "\n", encoding="utf-8")
            env["PDASGD_SUITE_SELECT"] = str(select)
        command = _pytest_command(scope, timeout)
        watchdog_s = timeout + WATCHDOG_MARGIN_S
        rc, killed = _run_pytest_once(tests_dir, command, env, log, results, watchdog_s)
        records = _read_records(results)
        collected = [record["nodeids"] for record in records if record["event"] == "collected"]
        if universe is None and collected:
            universe = collected[0]
        last: dict[str, dict[str, Any]] = {}
        for record in records:
            if record["event"] in ("start", "finish"):
                last[record["nodeid"]] = record
        unfinished = [n for n, record in last.items() if record["event"] == "start" and n not in synthetic]
        if not unfinished and (not killed and rc in (0, 1, 5) or last.keys() <= done_before):
            break  # a normal end, or a process that dies before running anything (nothing to gain from a restart)
        how = f"no progress for {watchdog_s} s, pytest killed" if killed else f"pytest process died (rc {rc})"
        with results.open("a", encoding="utf-8") as stream:
            for nodeid in unfinished:
                stream.write(json.dumps({
                    "event": "finish", "nodeid": nodeid, "outcome": "hang" if killed else "died", "injected": None,
                    "errors": {"call": {"type": None, "line": how, "ours": None, "timeout": killed}},
                    "leaked_threads": [],
                }) + "\n")  # fmt: skip
        synthetic.update(unfinished)
        done = done_before = set(last) | synthetic
        remaining = [nodeid for nodeid in (universe or []) if nodeid not in done]
        if not remaining:
            break
    return read_results(results)


def read_results(results: Path) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """The last ``finish`` record of each test, and the tests the first pytest process collected."""
    records = _read_records(results)
    collected = [record["nodeids"] for record in records if record["event"] == "collected"]
    finished = {record["nodeid"]: record for record in records if record["event"] == "finish"}
    return finished, collected[0] if collected else []


# ----------------------------------------------------------------------------------------------------- classifying


def _primary_error(record: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
    errors = record.get("errors") or {}
    for phase in ("call", "setup", "teardown"):
        if phase in errors:
            return phase, errors[phase]
    return None, {}


def refusal_setting(message: str) -> str:
    """The setting a refusal names: a known one, else its first `quoted` expression with numbers blanked."""
    for pattern, setting in REFUSAL_SETTINGS:
        if re.search(pattern, message):
            return setting
    quoted = re.search(r"`([^`]+)`", message)
    if quoted:
        return re.sub(r"\d+(\.\d+)?", "N", quoted.group(1))
    return first_words(message, 8)


def first_words(text: str, count: int) -> str:
    return " ".join(text.split()[:count])


def _is_refusal(error: dict[str, Any]) -> bool:
    """A setting error of ours: named "PD-ASGD..."/"PDASGDStrategy..." or raised in ``lightning_pdasgd``."""
    message = (error.get("message") or "").lstrip()
    ours = message.startswith(OUR_PREFIXES) or bool(error.get("raised_in_ours"))
    return error.get("type") in REFUSAL_TYPES and ours


def _refusal_inside_raises(error: dict[str, Any]) -> str | None:
    """Our refusal's message when ``pytest.raises(match=...)`` caught it instead of the error the test expects."""
    via = error.get("ours_via") or ""
    caught = re.search(r'Actual message: "(.*)"', error.get("message") or "", re.DOTALL)
    if error.get("type") == "AssertionError" and via.removeprefix("cause ") in REFUSAL_TYPES and caught:
        return caught.group(1)
    return None


def _plain_text(record: dict[str, Any] | None) -> str:
    if record is None:
        return "not run"
    _phase, error = _primary_error(record)
    return f"{record['outcome']}: {error['line']}" if error else record["outcome"]


def classify(record: dict[str, Any], plain: dict[str, Any] | None) -> Failure:
    """One failing test's class (see the module docstring for the order)."""
    phase, error = _primary_error(record)
    leaks = record.get("leaked_threads") or []
    failure = Failure(
        test=record["nodeid"],
        cls="semantic difference",
        error=error.get("line") or f"{record['outcome']} without an error",
        ours=error.get("ours"),
        phase=phase,
        raised_at=error.get("raised_at"),
        plain=_plain_text(plain),
        leaked_threads=[leak["name"] + ("" if leak["alive_after_grace"] else " (ended within 2 s)") for leak in leaks],
    )
    plain_failed = plain is not None and plain["outcome"] in FAILING
    timed_out = record["outcome"] == "hang" or any(e.get("timeout") for e in (record.get("errors") or {}).values())
    if timed_out and not plain_failed:
        failure.cls = "hang"
    elif leaks:
        failure.cls = "leaked thread"
        if record["outcome"] not in FAILING or failure.error.startswith("AssertionError: Test left zombie thread"):
            failure.error = f"left alive: {', '.join(failure.leaked_threads)}"
    elif plain_failed:
        failure.cls = "fails with plain too"
    elif _is_refusal(error):
        failure.cls = "refused"
        failure.setting = refusal_setting(error.get("message") or error["line"])
    elif (refusal := _refusal_inside_raises(error)) is not None:
        failure.cls, failure.kind = "refused", "caught by the test's pytest.raises instead of the error it expects"
        failure.setting = refusal_setting(refusal)
    elif record["outcome"] == "died" or (
        error.get("type") not in (None, "AssertionError", "Failed") and bool(error.get("ours"))
    ):
        failure.cls = "crash"
    elif error.get("type") == "AssertionError" and error.get("raised_in_ours"):
        failure.cls = "crash"  # an `assert` of our own
    else:
        failure.kind = "assertion" if error.get("type") in ("AssertionError", "Failed", None) else error["type"]
    return failure


# ----------------------------------------------------------------------------------------------------- rendering


def normalize(line: str) -> str:
    """An error line with its run-specific parts blanked, to count which differences recur."""
    line = re.sub(r"0x[0-9a-f]+", "0x…", line)
    line = re.sub(r"(/tmp|/private)[^\s'\")]*", "<tmp>", line)
    line = re.sub(r"(?<![\w.])-?\d+(\.\d+)?(e-?\d+)?(?![\w])", "N", line)
    return line if len(line) <= 160 else line[:157] + "..."


def _cell(text: str | None) -> str:
    if not text:
        return ""
    text = text.replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= 200 else text[:197] + "..."


def _short_id(nodeid: str) -> str:
    return nodeid.removeprefix("tests/tests_pytorch/")


def render_markdown(summary: dict[str, Any], failures: list[Failure]) -> str:
    counts = Counter(failure.cls for failure in failures)
    outcomes = summary["outcomes"]
    lines = [
        "## Lightning's own tests with `strategy=\"pdasgd\"` injected",
        "",
        f"Generated by `tools/lightning_suite.py` on {summary['date']}: Lightning's tests {summary['lightning_tests']}"
        f" (`tests/tests_pytorch/{{{','.join(summary['scope'])}}}`, legacy-checkpoint tests left out) against lightning"
        f" {summary['lightning']}, torch {summary['torch']}, lightning-pdasgd {summary.get('pdasgd_revision', '?')},"
        " CPU; every single-device CPU `Trainer(strategy=\"auto\")` built with `strategy=\"pdasgd\"`,"
        f" {summary['timeout']} s per test. Every failing test was run again with plain Lightning.",
        "",
        f"{summary['tests']} tests: {outcomes.get('passed', 0)} passed ({summary['passed_with_pdasgd']} of them built"
        f" a PD-ASGD Trainer), {outcomes.get('skipped', 0)} skipped, {outcomes.get('xfailed', 0)} xfailed,"
        f" {len(failures)} failing ({summary['minutes']:.0f} min).",
        "",
        "| Class | Tests |",
        "| --- | --- |",
        *(f"| {cls} | {counts.get(cls, 0)} |" for cls in CLASSES),
        "",
    ]
    for cls in ("crash", "hang", "leaked thread"):
        chosen = [failure for failure in failures if failure.cls == cls]
        lines += [f"### {cls.capitalize()} ({len(chosen)})", ""]
        if chosen:
            lines += ["| Test | Error | Innermost `lightning_pdasgd` frame |", "| --- | --- | --- |"]
            lines += [f"| `{_short_id(f.test)}` | {_cell(f.error)} | {_cell(f.ours)} |" for f in chosen]
        else:
            lines.append("None.")
        lines.append("")
    refused = [failure for failure in failures if failure.cls == "refused"]
    by_setting: dict[str, list[Failure]] = defaultdict(list)
    for failure in refused:
        by_setting[failure.setting or "?"].append(failure)
    lines += [f"### Refused ({len(refused)})", ""]
    if refused:
        lines += ["| Setting | Tests | Example |", "| --- | --- | --- |"]
        for setting, group in sorted(by_setting.items(), key=lambda item: (-len(item[1]), item[0])):
            lines.append(f"| {setting} | {len(group)} | `{_short_id(group[0].test)}`: {_cell(group[0].error)} |")
    else:
        lines.append("None.")
    lines.append("")
    semantic = [failure for failure in failures if failure.cls == "semantic difference"]
    lines += [f"### Semantic differences ({len(semantic)})", ""]
    if semantic:
        groups: dict[str, list[Failure]] = defaultdict(list)
        for failure in semantic:
            groups[normalize(failure.error)].append(failure)
        common = sorted(groups.items(), key=lambda item: -len(item[1]))[:15]
        lines += [
            "Most common first lines (numbers, addresses and temporary paths blanked):",
            "",
            "| Tests | Error | Example |",
            "| --- | --- | --- |",
            *(f"| {len(group)} | {_cell(line)} | `{_short_id(group[0].test)}` |" for line, group in common),
            "",
            "| Test | Error | Kind | Innermost `lightning_pdasgd` frame |",
            "| --- | --- | --- | --- |",
            *(f"| `{_short_id(f.test)}` | {_cell(f.error)} | {f.kind} | {_cell(f.ours)} |" for f in semantic),
        ]
    else:
        lines.append("None.")
    lines.append("")
    plain = [failure for failure in failures if failure.cls == "fails with plain too"]
    lines += [f"### Fails with plain Lightning too ({len(plain)})", ""]
    if plain:
        lines += ["| Test | With PD-ASGD | Plain |", "| --- | --- | --- |"]
        lines += [f"| `{_short_id(f.test)}` | {_cell(f.error)} | {_cell(f.plain)} |" for f in plain]
    else:
        lines.append("None.")
    lines.append("")
    return "\n".join(lines)


def write_markdown_into(path: Path, section: str) -> None:
    """Replace the text between the markers in ``path`` (or append it, with the markers)."""
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    block = f"{BEGIN_MARK}\n{section.rstrip()}\n{END_MARK}"
    if BEGIN_MARK in text and END_MARK in text:
        head, rest = text.split(BEGIN_MARK, 1)
        text = head + block + rest.split(END_MARK, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text, encoding="utf-8")


# ----------------------------------------------------------------------------------------------------- main


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


def _lightning_tests_version(src: Path) -> str:
    version = src / "src" / "version.info"
    return version.read_text(encoding="utf-8").strip() if version.exists() else f"from {src}"


def _revision() -> str:
    """This repository's commit, and the ``lightning_pdasgd`` files that differ from it (others edit as we run)."""
    def git(*args: str) -> str:
        result = subprocess.run(["git", *args], cwd=TOOLS_DIR.parent, capture_output=True, text=True, check=False)
        return result.stdout.strip()

    changed = [line.strip() for line in git("status", "--porcelain", "--", "lightning_pdasgd").splitlines()]
    return git("rev-parse", "--short", "HEAD") + (f" + uncommitted: {', '.join(changed)}" if changed else "")


def _span_minutes(paths: list[Path]) -> float:
    """Minutes from the first record to the last, over the records of both runs (the time spent in tests)."""
    times = [record["time"] for path in paths for record in _read_records(path) if "time" in record]
    return (max(times) - min(times)) / 60 if times else 0.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("lightning_src", type=Path, help="Lightning checkout (holds tests/tests_pytorch)")
    parser.add_argument("out", type=Path, help="output folder (results.json, results.md, raw records and logs)")
    parser.add_argument("--scope", nargs="+", default=list(SCOPE), help="folders under tests/tests_pytorch")
    parser.add_argument("--timeout", type=int, default=120, help="per-test timeout in seconds (pytest-timeout)")
    parser.add_argument("--markdown-into", type=Path, help="also write the Markdown between markers in this file")
    parser.add_argument("--reuse", action="store_true", help="classify OUT's existing records again, run nothing")
    args = parser.parse_args(argv)

    src = args.lightning_src.resolve()
    if not (src / "tests" / "tests_pytorch").is_dir():
        parser.error(f"{src} has no tests/tests_pytorch")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)

    run_info = out / "run.json"
    if args.reuse:
        records, universe = read_results(out / "pdasgd.jsonl")
    else:
        command = " ".join([Path(sys.executable).name, *sys.argv])
        run_info.write_text(json.dumps({"command": command, "pdasgd_revision": _revision()}) + "\n", encoding="utf-8")
        print(f"[lightning_suite] PD-ASGD run of {src}, log in {out / 'pytest-pdasgd.log'}", flush=True)
        records, universe = run_suite(src, out, "pdasgd", None, args.scope, args.timeout)
    failing = [
        nodeid
        for nodeid in universe
        if nodeid in records and (records[nodeid]["outcome"] in FAILING or records[nodeid].get("leaked_threads"))
    ]
    if args.reuse:
        plain_records, _ = read_results(out / "plain.jsonl")
    elif failing:
        print(f"[lightning_suite] {len(records)} tests ran, {len(failing)} failing: plain run of those", flush=True)
        plain_records, _ = run_suite(src, out, "plain", failing, args.scope, args.timeout)
    else:
        plain_records = {}
    failures = [classify(records[nodeid], plain_records.get(nodeid)) for nodeid in failing]

    outcomes = Counter(records[nodeid]["outcome"] for nodeid in universe if nodeid in records)
    summary = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        **(json.loads(run_info.read_text(encoding="utf-8")) if run_info.exists() else {}),
        "lightning_src": str(src),
        "lightning_tests": _lightning_tests_version(src),
        "lightning": _version("lightning"),
        "torch": _version("torch"),
        "timeout": args.timeout,
        "scope": args.scope,
        "tests": len(universe),
        "not_run": [nodeid for nodeid in universe if nodeid not in records],
        "outcomes": dict(outcomes),
        "passed_with_pdasgd": sum(
            1 for record in records.values() if record["outcome"] == "passed" and record.get("injected")
        ),
        "counts": {cls: sum(failure.cls == cls for failure in failures) for cls in CLASSES},
        "minutes": _span_minutes([out / "pdasgd.jsonl", out / "plain.jsonl"]),
    }
    (out / "results.json").write_text(
        json.dumps({"summary": summary, "failures": [asdict(failure) for failure in failures]}, indent=1) + "\n",
        encoding="utf-8",
    )
    markdown = render_markdown(summary, failures)
    (out / "results.md").write_text(markdown, encoding="utf-8")
    if args.markdown_into:
        write_markdown_into(args.markdown_into, markdown)
    print(json.dumps(summary["counts"], indent=1))
    print(f"[lightning_suite] wrote {out / 'results.json'} and {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
