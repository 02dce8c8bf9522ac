"""Errors of a fit against a simulation's truth (`jcal.simulate`): what the demo prints and the
benchmarks record."""

from __future__ import annotations

import numpy as np

__all__ = ["mapping_error_mas", "photometric_error_mmag"]


def mapping_error_mas(sim, result) -> float:
    """RMS per coordinate (mas) of the fitted minus the true sky position of every associated
    measurement's true pixel."""
    a, tr = result.association, sim.truth.measurements
    rows = a.source_index
    args = (tr.visit[rows], tr.detector[rows], tr.x[rows], tr.y[rows])
    ra, dec = result.pixel_to_sky(*args)
    tra, tdec = sim.truth.pixel_to_sky(*args)
    d2 = ((ra - tra) * np.cos(np.radians(tdec)) * 3.6e6) ** 2 + ((dec - tdec) * 3.6e6) ** 2
    return float(np.sqrt(np.mean(d2) / 2))


def photometric_error_mmag(sim, result) -> float:
    """RMS of fitted vs true calibration (mmag) at the measurements' true pixels, common offset
    removed, over the measurements that constrain the calibration."""
    a, tm, src = result.association, sim.truth.measurements, sim.data.sources
    rows = a.source_index
    args = (src.visit[rows], src.detector[rows], tm.x[rows], tm.y[rows])
    d = 2.5 * np.log10(result.photometry.calibration(*args) / sim.truth.calibration(*args))
    d = d[result.photometry.informative()]
    return float(np.sqrt(np.mean((d - np.median(d)) ** 2)) * 1000)
