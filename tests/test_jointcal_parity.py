"""Parity with LSST jointcal on the real cfht_minimal data, through the command line.

`configs/jointcal_cfht_minimal.json` is the jointcal-compatible configuration of jointcal's
own cfht_minimal test; the expected metrics are jointcal's (see the data set's README).
"""

import json
from pathlib import Path

import pytest

from jcal.cli import main

DATA = Path(__file__).resolve().parent / "data"
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "jointcal_cfht_minimal.json"

JOINTCAL = {  # jointcal's tests/test_jointcal_cfht_minimal.py, photometry only
    "simpleFlux": {"chi2": 2.336915, "ndof": 1},
    "simpleMagnitude": {"chi2": 2.23008, "ndof": 1},
}


@pytest.mark.parametrize("model", sorted(JOINTCAL))
def test_cfht_minimal_metrics_match_jointcal(model, tmp_path):
    out = tmp_path / "out"
    status = main(["fit", str(DATA / "cfht_minimal"), "--lsst", "--config", str(CONFIG),
                   "--set", f"photometryModel={model}", "--out", str(out), "--quiet"])
    assert status == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["photometry_collected_refStars"] == 346
    assert m["photometry_prepared_refStars"] == 2
    assert m["photometry_matched_fittedStars"] == 2
    assert m["photometry_prepared_fittedStars"] == 2
    assert m["photometry_prepared_ccdImages"] == 2
    assert m["photometry_final_ndof"] == JOINTCAL[model]["ndof"]
    assert f"{m['photometry_final_chi2']:.5g}" == f"{JOINTCAL[model]['chi2']:.5g}"  # five significant figures
