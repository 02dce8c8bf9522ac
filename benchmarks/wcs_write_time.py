"""Time to write a fit's WCS files by format (small preset, or the one given):
python benchmarks/wcs_write_time.py [PRESET]. Prints seconds per format and the WCS summary."""

from __future__ import annotations

import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import jcal
from wcs_outputs import summarise

preset = sys.argv[1] if len(sys.argv) > 1 else "small"
sim = jcal.simulate(preset, seed=0)
result = jcal.fit(sim.data, jcal.FitConfig(visit_order=3, photometry=False))
with tempfile.TemporaryDirectory() as tmp:
    for fmt in ("sip", "tpv", "both"):
        result.config = dataclasses.replace(result.config, wcs_format=fmt)
        t0 = time.perf_counter()
        out = Path(tmp) / fmt
        result.write(out)
        print(f"{preset} {fmt}: write {time.perf_counter() - t0:.2f} s, {len(result.association.ccd_visits)} detector-visits")
        for folder in ("wcs", "wcs_tpv"):
            if (out / folder).is_dir():
                print("  ", summarise(out / folder))
