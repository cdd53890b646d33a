"""Render the compatibility matrix's JSON (written by ``tests/test_compat_matrix.py``) as a markdown table.

Why generated: the README's table must say what the tests measured, not what someone remembers. Usage::

    PDASGD_COMPAT_JSON=compat.json python -m pytest tests/test_compat_matrix.py
    python tools/compat_table.py compat.json [--out table.md]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

RESULT_ORDER = {"DIFFERENT": 0, "refused": 1, "same": 2}


def _short(value: Any) -> str:
    """A cell-sized rendering of one measured value."""
    if isinstance(value, list):
        return f"{len(value)} values" if len(value) > 3 else ", ".join(_short(item) for item in value)
    if isinstance(value, float):
        return f"{value:.4g}"
    text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_cell(check: dict[str, Any]) -> str:
    what, plain, pdasgd = check["what"], check.get("plain"), check.get("pdasgd")
    mark = "" if check.get("ok") else " **(fails)**"
    if plain is None:
        return f"{what}: {_short(pdasgd)}{mark}"
    if plain == pdasgd:
        return f"{what}: equal ({_short(plain)}){mark}"
    tolerance = check.get("tolerance")
    bound = f", tol {tolerance:g}" if isinstance(tolerance, (int, float)) and tolerance else ""
    return f"{what}: plain {_short(plain)} / pdasgd {_short(pdasgd)}{bound}{mark}"


def render(rows: dict[str, dict[str, Any]]) -> str:
    """The markdown table, DIFFERENT rows first, then refused, then same; alphabetical within each."""
    lines = [
        "| Feature | Outcome compared | PD-ASGD run | Result | Measured |",
        "| --- | --- | --- | --- | --- |",
    ]
    ordered = sorted(rows.values(), key=lambda row: (RESULT_ORDER.get(row["result"], -1), row["feature"].lower()))
    for row in ordered:
        measured = "<br>".join(_check_cell(check) for check in row["checks"]).replace("|", "\\|")
        result = row["result"] if row["result"] != "DIFFERENT" else "**DIFFERENT**"
        if row.get("expected") == "refused" and row["result"] != "refused":
            result += " (should be refused)"
        cells = [row["feature"], row["outcome"], row["strategy"], result, measured]
        lines.append("| " + " | ".join(cell.replace("\n", " ") for cell in cells) + " |")
    counts = {name: sum(row["result"] == name for row in rows.values()) for name in ("same", "refused", "DIFFERENT")}
    lines.append("")
    lines.append(f"{counts['same']} same, {counts['refused']} refused, {counts['DIFFERENT']} DIFFERENT.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="the JSON file the matrix test wrote ($PDASGD_COMPAT_JSON)")
    parser.add_argument("--out", type=Path, help="write the table here instead of standard output")
    args = parser.parse_args(argv)
    rows = json.loads(args.results.read_text())
    if not rows:
        print(f"{args.results}: no rows (did the matrix test run?)", file=sys.stderr)
        return 1
    table = render(rows)
    if args.out is None:
        sys.stdout.write(table)
    else:
        args.out.write_text(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
