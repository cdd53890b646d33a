"""``tools/compat_table.py`` renders the matrix's recorded rows faithfully (the README table comes from it)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_table_lists_every_recorded_row_with_its_numbers(tmp_path: Path) -> None:
    rows = {
        "Timer": {
            "feature": "Timer",
            "outcome": "stops after step 1",
            "strategy": "max_in_flight=1",
            "expected": "same",
            "result": "same",
            "checks": [{"what": "global_step", "plain": 1, "pdasgd": 1, "tolerance": 0.0, "ok": True}],
        },
        "ModelPruning": {
            "feature": "ModelPruning",
            "outcome": "accuracy",
            "strategy": "max_in_flight=1",
            "expected": "same",
            "result": "DIFFERENT",
            "checks": [{"what": "validation accuracy", "plain": 0.85, "pdasgd": 0.1, "tolerance": 0.0, "ok": False}],
        },
        "GradientAccumulationScheduler": {
            "feature": "GradientAccumulationScheduler",
            "outcome": "refused",
            "strategy": "default",
            "expected": "refused",
            "result": "refused",
            "checks": [{"what": "error names", "plain": None, "pdasgd": "msg", "ok": True}],
        },
    }
    source = tmp_path / "rows.json"
    source.write_text(json.dumps(rows))
    out = tmp_path / "table.md"
    subprocess.run(
        [sys.executable, str(ROOT / "tools" / "compat_table.py"), str(source), "--out", str(out)], check=True
    )
    table = out.read_text().splitlines()
    body = [line for line in table if line.startswith("| ") and not line.startswith("| Feature") and "---" not in line]
    assert [line.split(" | ")[0] for line in body] == ["| ModelPruning", "| GradientAccumulationScheduler", "| Timer"]
    assert "plain 0.85 / pdasgd 0.1" in body[0] and "**DIFFERENT**" in body[0]
    assert "global_step: equal (1)" in body[2]
    assert table[-1] == "1 same, 1 refused, 1 DIFFERENT."


def test_empty_results_are_an_error(tmp_path: Path) -> None:
    source = tmp_path / "rows.json"
    source.write_text("{}")
    done = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "compat_table.py"), str(source)], capture_output=True, check=False
    )
    assert done.returncode == 1 and b"no rows" in done.stderr
