"""Accuracy of a fit against a simulation's truth, shared by `bench.py` and `user_path.py`.

Every function takes evaluators of the fitted solution (so it serves a `jcal.FitResult` in memory
and a solution reloaded from an output directory alike) and the `jcal.simulate.Truth`.
"""

from __future__ import annotations

import numpy as np

MAS_PER_DEG = 3.6e6


def _by_group(values: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(unique keys, RMS of values per key)."""
    u, inv = np.unique(keys, return_inverse=True)
    return u, np.sqrt(np.bincount(inv, weights=values, minlength=u.size) / np.bincount(inv, minlength=u.size))


def mapping_errors(pixel_to_sky, truth, rows: np.ndarray | None = None) -> dict:
    """Fitted vs true sky position at the true pixels of detections (`rows`, default all): per-axis RMS,
    median, worst visit and worst detector-visit (RMS over their detections), all in mas.

    pixel_to_sky(visit, detector, x, y) -> (ra, dec) deg: the fitted map."""
    tm = truth.measurements
    rows = np.arange(len(tm)) if rows is None else rows
    v, d, x, y = tm.visit[rows], tm.detector[rows], tm.x[rows], tm.y[rows]
    ra, dec = pixel_to_sky(v, d, x, y)
    tra, tdec = truth.pixel_to_sky(v, d, x, y)
    dra = ((ra - tra + 180) % 360 - 180) * np.cos(np.radians(tdec)) * MAS_PER_DEG
    sq = (dra**2 + ((dec - tdec) * MAS_PER_DEG) ** 2) / 2  # per axis
    _, per_visit = _by_group(sq, v)
    _, per_ccd = _by_group(sq, v * 100000 + d)
    return {"rms_mas": float(np.sqrt(sq.mean())), "median_mas": float(np.median(np.sqrt(sq))),
            "worst_visit_mas": float(per_visit.max()), "worst_ccd_visit_mas": float(per_ccd.max())}


def photometric_error_mmag(calibration, truth, rows: np.ndarray) -> dict:
    """Fitted vs true calibration at the true pixels of detections `rows`, common offset (the median)
    removed: RMS, robust core (1.4826 MAD) and worst detector-visit RMS, mmag.

    calibration(visit, detector, x, y) -> nJy per count: the fitted calibration."""
    tm = truth.measurements
    args = (tm.visit[rows], tm.detector[rows], tm.x[rows], tm.y[rows])
    d = 2.5 * np.log10(calibration(*args) / truth.calibration(*args))
    d = (d - np.median(d)) * 1000
    _, per_ccd = _by_group(d**2, args[0] * 100000 + args[1])
    return {"rms_mmag": float(np.sqrt(np.mean(d**2))), "core_mmag": float(1.4826 * np.median(np.abs(d))),
            "worst_ccd_visit_mmag": float(per_ccd.max())}
