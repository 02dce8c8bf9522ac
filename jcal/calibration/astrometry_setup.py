"""The astrometric fit's set-up: reference constraints, starting stars, held-out stars, and the
re-association through a fitted map (`jcal.calibration.astrometry` runs the fit)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jcal_models import MAS, Stars

from ..associate import _ARCSEC, Association, _match_references
from ..config import FitConfig
from ..data import InputData, InputError
from ..sky import unit_vectors
from ..solution import AstrometricSolution
from ..solver import Solver


def proper_motion_wanted(data: InputData, assoc: Association, config: FitConfig) -> bool:
    if config.proper_motion != "auto":
        return config.proper_motion == "on"
    epochs = data.visits.epoch[np.isin(data.visits.visit, assoc.visits)]
    return float(np.ptp(epochs)) > config.pm_min_baseline_years


def reference_constraints(data: InputData, assoc: Association, config: FitConfig, epoch0: float):
    ref = data.refcat
    has = assoc.star_ref >= 0
    r = np.where(has, assoc.star_ref, 0)
    err_ra = config.reference_error_mas if config.reference_error_mas is not None else ref.ra_err[r]
    err_dec = config.reference_error_mas if config.reference_error_mas is not None else ref.dec_err[r]
    n = len(has)
    has_pm = has & ref.has_proper_motion[r]
    # the prior of stars without a catalog proper motion is centred on the matched reference stars'
    # median motion: centred on 0, it biases every faint star the same way (the survey's mean motion),
    # and with them each visit's mapping by (epoch - mean epoch) x that bias
    centre = [float(np.median(ref.pmra[r][has_pm])), float(np.median(ref.pmdec[r][has_pm]))] if has_pm.any() \
        else [0.0, 0.0]
    star_data = {
        "ra": np.where(has, ref.ra[r], assoc.star_ra),
        "dec": np.where(has, ref.dec[r], assoc.star_dec),
        "epoch": np.where(has, ref.epoch[r], epoch0),
        "position_err": np.stack([np.broadcast_to(err_ra, n), np.broadcast_to(err_dec, n)], 1) * MAS,
        "has_ref": has.astype(float),
        "pm": np.stack([np.where(has_pm, ref.pmra[r], centre[0]), np.where(has_pm, ref.pmdec[r], centre[1])],
                       1) * MAS,
        # stars without a catalog proper motion get a broad prior (around `centre`): a star seen at two
        # epochs then still constrains the mapping, with its motion's uncertainty accounted for
        "pm_err": np.stack([np.where(has_pm, ref.pmra_err[r], config.pm_prior_mas_yr),
                            np.where(has_pm, ref.pmdec_err[r], config.pm_prior_mas_yr)], 1) * MAS,
        "has_pm": np.ones(n),
    }
    if not np.all(np.isfinite(star_data["position_err"][has])):
        raise InputError("refcat: matched reference stars have no position errors; set "
                         "config.reference_error_mas")
    return star_data, has, has_pm


def initial_stars(data: InputData, assoc: Association, epoch0: float, proper_motion: bool) -> Stars:
    """Start matched stars at their reference position (carried to epoch0), others at the mean."""
    ra = np.where(np.isfinite(assoc.star_ref_ra), assoc.star_ref_ra, assoc.star_ra)
    dec = np.where(np.isfinite(assoc.star_ref_dec), assoc.star_ref_dec, assoc.star_dec)
    return Stars.at(ra, dec, np.full(len(ra), epoch0), proper_motion)


def missed_reference_matches(data: InputData, assoc: Association, stars: Stars, config: FitConfig) -> int:
    """How many more of the fitted `stars` (at their fitted positions) match a reference star than the
    association `assoc` matched: a first guess too poor for matching shows here."""
    pos = jax.vmap(lambda s, t: s.position(t))(stars, jnp.asarray(assoc.star_epoch))
    xyz = unit_vectors(np.asarray(pos[0]), np.asarray(pos[1]))
    ref = data.refcat
    star_ref, _ = _match_references(xyz, assoc.star_epoch, unit_vectors(ref.ra, ref.dec), ref.epoch, ref.pmra,
                                    ref.pmdec, config.ref_match_radius_arcsec * _ARCSEC)
    return int(np.sum(star_ref >= 0) - np.sum(assoc.star_ref >= 0))


def fitted_projector(data: InputData, a: Association, model):
    """`jcal.associate`'s `project`: sky positions through the fitted `model` where it has one, else
    through the first-guess WCS (corrected by the association's alignment)."""
    solution = AstrometricSolution(model, a.visits, a.detectors, a.ccd_visits)
    fitted = {tuple(k) for k in solution.ccd_visits.tolist()}
    alignment = a.alignment

    def project(rows, visit, detector):
        ra, dec = np.full(rows.size, np.nan), np.full(rows.size, np.nan)
        on = np.array([(v, d) in fitted for v, d in zip(visit.tolist(), detector.tolist())], bool)
        if on.any():
            ra[on], dec[on] = solution.pixel_to_sky(visit[on], detector[on], data.sources.x[rows[on]],
                                                    data.sources.y[rows[on]])
        for v, d in {(int(v), int(d)) for v, d in zip(visit[~on], detector[~on])}:
            sel = np.flatnonzero(~on & (visit == v) & (detector == d))
            ra[sel], dec[sel] = data.ccd_visits[(v, d)].wcs.all_pix2world(data.sources.x[rows[sel]],
                                                                          data.sources.y[rows[sel]], 0)
            if alignment is not None:
                ra[sel], dec[sel] = alignment.apply_one(v, d, ra[sel], dec[sel])
        return ra, dec

    return project


HOLDOUT_MIN_MEASUREMENTS = 3  # a held-out star needs this many detections (its own fit leaves residuals)


def holdout_stars(assoc: Association, has_ref: np.ndarray, fraction: float) -> np.ndarray:
    """(S,) bool: a reproducible `fraction` of the stars without a reference star and with at least
    HOLDOUT_MIN_MEASUREMENTS detections, held out of the fit to validate it."""
    held = np.zeros(assoc.n_stars, bool)
    eligible = np.flatnonzero(~has_ref & (np.bincount(assoc.star, minlength=assoc.n_stars)
                                          >= HOLDOUT_MIN_MEASUREMENTS))
    n = int(round(fraction * eligible.size))
    if n:
        held[np.random.default_rng(20140).choice(eligible, n, replace=False)] = True
    return held


def references_constrain_every_group(solver: Solver, index, weights) -> bool:
    """True if, with only reference-matched measurements, every mapping group keeps at least as
    many residuals as it has parameters (else the early stages use every measurement)."""
    for key, n_groups, p in zip(solver.layout.keys, solver.layout.n_groups, solver.layout.row_sizes):
        counts = np.bincount(index[key], weights=weights, minlength=n_groups) if key in index else [weights.sum()]
        if np.min(counts) * 2 < 2 * p:
            return False
    return True
