#!/usr/bin/env bash
# Wall times of jcal's Rubin extra: `pip install -e ".[rubin]"` into a fresh venv, then
# examples/rubin/run_cfht_minimal.sh and tests/test_rubin.py with that venv. Results: benchmarks/rubin.md.
# Usage: benchmarks/rubin_timings.sh [PYTHON]   (default python3; pip's download cache is used if warm)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${1:-python3}"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
TIMEFORMAT="%R s"
cd "$ROOT"
"$PY" -m venv "$TMP/venv"
echo "python: $("$TMP/venv/bin/python" --version)"
echo -n "pip install -e .[rubin,test]: "; { time "$TMP/venv/bin/pip" install -q -e ".[rubin,test]" >/dev/null 2>&1; } 2>&1
echo -n "run_cfht_minimal.sh:          "; { time PATH="$TMP/venv/bin:$PATH" examples/rubin/run_cfht_minimal.sh "$TMP/butler-run" >/dev/null 2>&1; } 2>&1
grep -E '"photometry_final_(chi2|ndof)"|"photometry_prepared_ccdImages"' "$TMP/butler-run/metrics.json"
echo -n "pytest tests/test_rubin.py:   "; { time OPENBLAS_NUM_THREADS=1 "$TMP/venv/bin/python" -m pytest -q tests/test_rubin.py >/dev/null 2>&1; } 2>&1
