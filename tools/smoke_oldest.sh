#!/usr/bin/env bash
# Smoke test on the oldest versions pyproject.toml claims (torch 2.13.0, lightning 2.5.0): a fresh virtual
# environment, the package without its dependency resolution, and the core tests (one-in-flight equivalence
# with plain Lightning, concurrency, one real 2-process run). Called by .ci/run; about 2-3 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_OLDEST="2.13.0"
LIGHTNING_OLDEST="2.5.0"

venv="${SMOKE_VENV:-$(mktemp -d)/venv-oldest}"
python3 -m venv "$venv"
py="$venv/bin/python"
"$py" -m pip install --quiet --upgrade pip
"$py" -m pip install --quiet "torch==$TORCH_OLDEST" "lightning==$LIGHTNING_OLDEST"
"$py" -m pip install --quiet --no-deps -e .
"$py" -m pip install --quiet "torchmetrics>=1.0" "scikit-learn>=1.3" "pytest>=8" "pytest-timeout>=2.3"
"$py" - "$TORCH_OLDEST" "$LIGHTNING_OLDEST" <<'PY'
import sys

import lightning
import torch

torch_version, lightning_version = sys.argv[1], sys.argv[2]
assert torch.__version__.split("+")[0] == torch_version, torch.__version__
assert lightning.__version__ == lightning_version, lightning.__version__
print(f"oldest versions: torch {torch.__version__}, lightning {lightning.__version__}")
PY
"$py" -m pytest -q -p no:cacheprovider \
    tests/test_equivalence.py tests/test_concurrency.py tests/test_distributed.py::test_no_update_lost_across_ranks
