#!/usr/bin/env bash
# jcal inside the Rubin middleware on the real CFHT data shipped in tests/data/cfht_minimal:
#   butler create -> register dimensions + ingest -> pipetask run -> metrics read back from the butler.
# Usage: examples/rubin/run_cfht_minimal.sh WORKDIR     (after `pip install -e ".[rubin]"`)
# Writes WORKDIR/repo (the butler repository) and WORKDIR/metrics.json; prints the metrics.
# Expected (jointcal's own numbers on this data): photometry_final_chi2 2.336915, ndof 1, 2 ccdImages.
set -euo pipefail
if [ $# -ne 1 ]; then echo "usage: $0 WORKDIR" >&2; exit 2; fi
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
WORKDIR="$1"
REPO="$WORKDIR/repo"
if [ -e "$REPO" ]; then echo "$REPO already exists: choose a new WORKDIR (nothing is overwritten)" >&2; exit 1; fi
mkdir -p "$WORKDIR"
PY="${PYTHON:-python}"

# 1. A butler repository knowing jcal's storage class for the afw-format FITS inputs.
SEED="$("$PY" -c 'from jcal.rubin.storage import SEED_CONFIG; print(SEED_CONFIG)')"
butler create "$REPO" --seed-config "$SEED"

# 2. Instrument, filter, detector, visit (with sky regions), skymap/tract records; sourceTable_visit,
#    visitSummary and the refcat shards, chained in the collection jcal/inputs.
"$PY" -m jcal.rubin.repo ingest "$REPO" "$ROOT/tests/data/cfht_minimal" --instrument MegaPrime \
    --skymap jcal_skymap --tracts 0

# 3. The pipeline, with jointcal's cfht_minimal configuration: -C (an override file) and -c (one field).
pipetask run --register-dataset-types -b "$REPO" -i jcal/inputs -o jcal/cfht_minimal \
    -p "$ROOT/pipelines/jcal.yaml" \
    -C "jcal:$ROOT/examples/rubin/cfht_minimal_overrides.py" -c jcal:photometryModel=simpleFlux \
    -d "instrument='MegaPrime' AND skymap='jcal_skymap' AND tract=0"

# 4. Metrics read back from the butler.
"$PY" -m jcal.rubin.repo metrics "$REPO" jcal/cfht_minimal "$WORKDIR/metrics.json"
echo "wrote $WORKDIR/metrics.json"
