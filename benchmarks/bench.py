"""Benchmark: simulate a preset, then run `jcal fit` end to end and report time, memory, accuracy.

    python benchmarks/bench.py medium [large huge] [--visit-order 3]

Per preset it prints detections, stars, parameters (mapping and star), wall time split into
read / associate / fit (compilation included; a second fit shows the compiled cost) / write,
peak memory (max RSS of this process) and accuracy of the fitted mapping vs truth.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import tempfile
import time
from pathlib import Path

import os
import sys

import numpy as np

if "--warm-cache" not in sys.argv:  # cold: compilation included, as on a first run
    os.environ["JCAL_COMPILATION_CACHE"] = tempfile.mkdtemp(prefix="jcal-bench-cache-")

import jcal  # noqa: E402

jcal.configure()  # JAX set up before any computation (the cache folder above is private: mkdtemp)

from jcal.truth import mapping_errors, photometric_errors  # noqa: E402


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def run(preset: str, visit_order: int, second: bool, photometry: bool) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix=f"jcal-bench-{preset}-"))
    try:
        sim = jcal.simulate(preset, seed=0)
        jcal.write_simulation(sim, tmp / "input")
        config = jcal.FitConfig(visit_order=visit_order, photometry=photometry, photometry_visit_order=3)
        t = {}
        t0 = time.perf_counter()
        data = jcal.read_input(tmp / "input")
        t["read"] = time.perf_counter() - t0
        result = jcal.fit(data, config)
        t["associate"] = result.timings["associate"]
        t["fit_astrometry"] = result.timings["astrometry"]
        if photometry:
            t["fit_photometry"] = result.timings["photometry"]
        t0 = time.perf_counter()
        result.write(tmp / "out")
        t["write"] = time.perf_counter() - t0
        t["total"] = sum(t.values())
        if second:  # same shapes bucketed: no compilation the second time
            t0 = time.perf_counter()
            jcal.fit(data, config)
            t["second_fit_no_read_write"] = time.perf_counter() - t0
        a = result.association
        mapping = mapping_errors(result.pixel_to_sky, sim.truth, a.source_index)
        m = result.metrics
        return {
            "preset": preset, "detections": len(sim.data.sources), "measurements": len(a.star),
            "stars": len(a.star_ra), "sizes": m["astrometry_sizes"], "seconds": {k: round(v, 2) for k, v in t.items()},
            "stage_seconds": {k: round(v, 2) for k, v in m["astrometry_stage_seconds"].items()},
            "peak_rss_gb": round(peak_rss_gb(), 2), "chi2_per_ndof": round(m["astrometry_chi2_per_ndof"], 4),
            "mapping_error_vs_truth_mas": round(mapping["rms_mas"], 4),
            "first_guess_error_mas": round(float(np.mean(sim.truth.ccd_visits.wcs_error_rms_arcsec)) * 1e3, 1),
            "iterations": m["astrometry_iterations"], "outliers": m["astrometry_outliers"],
            **({"photometry_chi2_per_ndof": round(m["photometry_final_chi2"] / m["photometry_final_ndof"], 4),
                "photometric_error_vs_truth_mmag": round(photometric_errors(
                    result.photometry.calibration, sim.truth,
                    a.source_index[result.photometry.informative()])["rms_mmag"], 2),
                "photometry_repeatability_mmag": m.get("photometry_repeatability_mmag")} if photometry else {}),
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("presets", nargs="+")
    p.add_argument("--visit-order", type=int, default=3)
    p.add_argument("--second", action="store_true", help="time a second fit (compiled shapes reused)")
    p.add_argument("--warm-cache", action="store_true", help="use the persistent compilation cache")
    p.add_argument("--no-photometry", action="store_true")
    args = p.parse_args()
    for preset in args.presets:
        print(json.dumps(run(preset, args.visit_order, args.second, not args.no_photometry)), flush=True)


if __name__ == "__main__":
    main()
