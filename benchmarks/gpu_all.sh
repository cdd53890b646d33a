#!/usr/bin/env bash
# Every CUDA test and the GPU benchmark, results into one folder (issue #13). About 5-8 minutes on an H100.
#   bash benchmarks/gpu_all.sh OUT
# Writes OUT/env.txt, OUT/test_cuda.txt + OUT/test_cuda.xml (pytest, junit), OUT/results.md + OUT/results.json
# (benchmark) and OUT/benchmark.log. Exits non-zero when a test or the benchmark failed.
set -u
OUT="${1:?usage: bash benchmarks/gpu_all.sh OUT}"
mkdir -p "$OUT"
{ nvidia-smi || true; python -c "import sys, torch, lightning; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA'); print('lightning', lightning.__version__)"; } > "$OUT/env.txt" 2>&1
timeout 420 python -m pytest tests/test_cuda.py tests/test_exchange_precision.py tests/test_norm_clipping.py -q -rs -p no:cacheprovider \
    --junitxml="$OUT/test_cuda.xml" > "$OUT/test_cuda.txt" 2>&1
tests=$?
timeout 300 python -m benchmarks.gpu --out "$OUT" > "$OUT/benchmark.log" 2>&1
bench=$?
tail -n 3 "$OUT/test_cuda.txt"; cat "$OUT/results.md" 2>/dev/null
echo "tests exit $tests, benchmark exit $bench"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ]
