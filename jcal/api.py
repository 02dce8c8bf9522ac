"""`jcal.fit`: the one call that runs a whole calibration on in-memory data."""

from __future__ import annotations

import logging
import time

import numpy as np

import jcal_models as jm

from .associate import associate
from .config import FitConfig
from .data import InputData
from .calibration.astrometry import REMATCH_GAIN, fit_astrometry, fitted_projector, missed_reference_matches
from .result import FitResult, ccd_visits_not_fitted

log = logging.getLogger("jcal")


def fit(data: InputData, config: FitConfig | None = None, *, astrometry_model: jm.Transform | None = None,
        mapping_filter=None, progress=None) -> FitResult:
    """Associate, then fit astrometry and/or photometry as `config` asks.

    astrometry_model: a starting model of any form (see `jcal_models.core`); default: built
        from the first-guess WCS as `config.astrometry_model` says.
    mapping_filter: bool pytree like the model marking fitted leaves (`jcal_models.freeze`).
    progress: optional callable(stage: str, chi2: float), called after each stage.
    """
    config = config or FitConfig()
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    assoc = associate(data, config)
    timings["associate"] = time.perf_counter() - t0
    result = FitResult(data, config, assoc, timings=timings)
    missing = ccd_visits_not_fitted(data, assoc, config)
    if missing:  # never a silent hole: each is named in metrics.json too
        log.warning("%d detector-visit(s) get no calibration: %s", len(missing),
                    "; ".join(f"(visit={m['visit']}, detector={m['detector']}): {m['reason']}" for m in missing[:20])
                    + (f"; and {len(missing) - 20} more (metrics.json: ccd_visits_not_fitted)" if len(missing) > 20
                       else ""))
    if config.astrometry:
        t0 = time.perf_counter()
        result.astrometry = fit_astrometry(data, assoc, config, model=astrometry_model,
                                           mapping_filter=mapping_filter, progress=progress)
        for _ in range(config.rematch_rounds if astrometry_model is None else 0):  # bounded
            gain = missed_reference_matches(data, result.astrometry, config)
            if gain <= REMATCH_GAIN * max(int(np.sum(assoc.star_ref >= 0)), 1):
                break
            log.info("astrometry: the fitted stars match %d more reference stars: associating again through "
                     "the fitted map and refitting", gain)
            assoc = associate(data, config, project=fitted_projector(data, result))
            result = FitResult(data, config, assoc, timings=timings)
            result.astrometry = fit_astrometry(data, assoc, config, progress=progress)
        timings["astrometry"] = time.perf_counter() - t0
    if config.photometry:
        try:
            from .calibration.photometry import detector_fields_significant, fit_photometry
        except ImportError:  # pragma: no cover - photometry module not present
            log.warning("photometry is not available in this build; skipped")
        else:
            t0 = time.perf_counter()
            result.photometry = fit_photometry(data, assoc, config, astrometry=result.astrometry)
            if config.photometry_detector_order > 0 and not detector_fields_significant(result.photometry):
                log.info("photometry: the detector fields are consistent with 0: refitting without them")
                result.photometry = fit_photometry(data, assoc, config.replace(photometry_detector_order=0),
                                                   astrometry=result.astrometry)
            timings["photometry"] = time.perf_counter() - t0
    return result
