"""Errors of a fit against a simulation's truth (`jcal.simulate`): what the demo prints, the tests
check and the benchmarks record.

`mapping_errors` and `photometric_errors` take evaluators of the fitted solution, so they serve a
`jcal.FitResult` in memory and a solution reloaded from an output folder alike;
`mapping_error_mas` and `photometric_error_mmag` are their one-number summaries for a fit in memory.
"""

from __future__ import annotations

import numpy as np

__all__ = ["mapping_errors", "photometric_errors", "mapping_error_mas", "photometric_error_mmag"]

MAS_PER_DEG = 3.6e6


def _rms_by_group(squares: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """RMS of values per unique key, from their squares."""
    _, inv = np.unique(keys, return_inverse=True)
    return np.sqrt(np.bincount(inv, weights=squares) / np.bincount(inv))


def mapping_errors(pixel_to_sky, truth, rows: np.ndarray | None = None) -> dict:
    """Fitted vs true sky position at the true pixels of detections `rows` (default all): per-axis
    RMS, median, worst visit and worst detector-visit (RMS over their detections), all in mas.

    pixel_to_sky(visit, detector, x, y) -> (ra, dec) deg: the fitted map."""
    tm = truth.measurements
    rows = np.arange(len(tm)) if rows is None else rows
    v, d, x, y = tm.visit[rows], tm.detector[rows], tm.x[rows], tm.y[rows]
    ra, dec = pixel_to_sky(v, d, x, y)
    tra, tdec = truth.pixel_to_sky(v, d, x, y)
    dra = ((ra - tra + 180) % 360 - 180) * np.cos(np.radians(tdec)) * MAS_PER_DEG
    sq = (dra**2 + ((dec - tdec) * MAS_PER_DEG) ** 2) / 2  # per axis
    return {"rms_mas": float(np.sqrt(sq.mean())), "median_mas": float(np.median(np.sqrt(sq))),
            "worst_visit_mas": float(_rms_by_group(sq, v).max()),
            "worst_ccd_visit_mas": float(_rms_by_group(sq, v * 100000 + d).max())}


def photometric_errors(calibration, truth, rows: np.ndarray) -> dict:
    """Fitted vs true calibration at the true pixels of detections `rows`, common offset (the
    median) removed: RMS, robust core (1.4826 MAD) and worst detector-visit RMS, mmag.

    calibration(visit, detector, x, y) -> nJy per count: the fitted calibration."""
    tm = truth.measurements
    args = (tm.visit[rows], tm.detector[rows], tm.x[rows], tm.y[rows])
    d = 2.5 * np.log10(calibration(*args) / truth.calibration(*args))
    d = (d - np.median(d)) * 1000
    return {"rms_mmag": float(np.sqrt(np.mean(d**2))), "core_mmag": float(1.4826 * np.median(np.abs(d))),
            "worst_ccd_visit_mmag": float(_rms_by_group(d**2, args[0] * 100000 + args[1]).max())}


def mapping_error_mas(sim, result) -> float:
    """RMS per coordinate (mas) of the fitted minus the true map over the fit's measurements."""
    return mapping_errors(result.pixel_to_sky, sim.truth, result.association.source_index)["rms_mas"]


def photometric_error_mmag(sim, result) -> float:
    """RMS (mmag) of the fitted vs true calibration over the measurements that constrain it."""
    rows = result.association.source_index[result.photometry.informative()]
    return photometric_errors(result.photometry.calibration, sim.truth, rows)["rms_mmag"]
