"""`jcal.fit`: the one call that runs a whole calibration on in-memory data."""

from __future__ import annotations

import logging
import time

import jcal_models as jm

from .associate import associate
from .config import FitConfig
from .data import InputData
from .calibration.astrometry import fit_astrometry
from .jax_setup import ensure_configured, require_float64
from .progress import capture_warnings, step
from .result import FitResult
from .screen import screen_input

log = logging.getLogger("jcal")


def fit(data: InputData, config: FitConfig | None = None, *, astrometry_model: jm.Transform | None = None,
        mapping_filter=None, progress=None) -> FitResult:
    """Associate, then fit astrometry and/or photometry as `config` asks.

    astrometry_model: a starting model of any form (see `jcal_models.core`); default: built
        from the first-guess WCS as `config.astrometry_model` says.
    mapping_filter: bool pytree like the model marking fitted leaves (`jcal_models.freeze`).
    progress: optional callable(stage: str, chi2: float), called after each stage; a
        `jcal.progress.Progress` also shows association and each fit as a step.
    """
    ensure_configured()
    if astrometry_model is not None:
        if not isinstance(astrometry_model, jm.Transform):
            raise TypeError(f"astrometry_model must be a jcal_models.Transform (e.g. a TangentPlaneAstrometry), "
                            f"not {type(astrometry_model).__name__}; see docs/model_forms.md")
        require_float64(astrometry_model, "astrometry_model")
    config = config or FitConfig()
    with capture_warnings([]) as warnings:
        result = _fit(data, config, astrometry_model, mapping_filter, progress)
    result.warnings.extend(warnings)
    return result


def _fit(data, config, astrometry_model, mapping_filter, progress) -> FitResult:
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    data, screening = screen_input(data, config)
    with step(progress, "associating detections"):
        assoc = associate(data, config)
    timings["associate"] = time.perf_counter() - t0
    result = FitResult(data, config, assoc, timings=timings, input_screening=screening)
    if config.astrometry:
        t0 = time.perf_counter()
        with step(progress, "astrometric fit"):
            result.astrometry = fit_astrometry(data, assoc, config, model=astrometry_model,
                                               mapping_filter=mapping_filter, progress=progress)
        assoc = result.association = result.astrometry.association  # re-associated if the fit matched more
        timings["astrometry"] = time.perf_counter() - t0
    if config.photometry:
        try:
            from .calibration.photometry import fit_photometry
        except ImportError:  # pragma: no cover - photometry module not present
            log.warning("photometry is not available in this build; skipped")
        else:
            t0 = time.perf_counter()
            with step(progress, "photometric fit"):
                result.photometry = fit_photometry(data, assoc, config, astrometry=result.astrometry,
                                                   progress=progress)
            timings["photometry"] = time.perf_counter() - t0
    return result
