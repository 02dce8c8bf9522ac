"""The photometric problem: residuals, and the set-up that turns an association into a
`StructuredProblem` (bands, usable measurements, reference constraints with colour terms, the
starting model and star values). The conventions are explained in docs/photometry.md."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np

import jcal_models as jm
from jcal_models.photometry import (AB_ZERO_POINT_NJY, PhotometricStars, PhotometricTransform, WithColourTerms,
                                    freeze_colour_slope)

from ..associate import Association
from ..config import FitConfig
from ..data import InputData, InputError
from ..photometry_solution import evaluate_calibration
from ..sky import unit_vectors
from ..solver import StructuredProblem
from .photometry_setup import (MAG_PER_FRACTION, bands_of, check_colour_spread, colour_term_errors,
                               colour_term_model, detector_fields, focal_domain, informative_measurements,
                               initial_calibration, reference_band, reference_colours, reference_fluxes,
                               focal_plane_map, initial_photometric_model)

log = logging.getLogger("jcal.calibration.photometry")


def instrument_value(model, star, m):
    """The star's flux (or magnitude) in the measurement's band, in the instrument system.

    Without colour terms, its fitted value. With them (`WithColourTerms`), a star whose reference
    constraint is colour-transformed (m["colour_on"] = 1) is carried in the reference system, so
    its instrument value is s' + delta(colour) (flux: F' 10^(-0.4 delta)), see the module docstring.
    """
    value = star.value[m["band"]]
    if not isinstance(model, WithColourTerms):
        return value
    delta = model.colour(m["band"], m["colour"]) * m["colour_on"]
    return value + delta if star.kind == "magnitude" else value * 10.0 ** (-0.4 * delta)


def flux_residual(model, star, m):
    """Whitened residual (1,) of one measurement under a flux model (see module docstring).

    sigma = |c| * m["err"], with c the current calibration when m["live"] is 1 (so the Jacobian
    includes the error's derivative), or the calibration frozen in m["c_fixed"] when it is 0
    (jointcal's convention: the error is held fixed during the linear solve).
    """
    c = model(m["x"], m["y"])
    scale = jnp.where(m["live"] > 0, jnp.abs(c), m["c_fixed"])
    return jnp.reshape((m["inst_flux"] * c - instrument_value(model, star, m)) / (scale * m["err"]), (1,))


def magnitude_residual(model, star, m):
    """Whitened residual (1,) of one measurement under a magnitude model."""
    z = model(m["x"], m["y"])
    return jnp.reshape((m["inst_mag"] + z - instrument_value(model, star, m)) / m["sigma"], (1,))


def reference_photometry_residual(star, ref):
    """(bands,) whitened reference-flux constraints of one star (zero where it has none)."""
    return (star.value - ref["value"]) / ref["err"] * ref["has"]


@dataclass
class PhotometryProblem:
    """The photometric fit's problem and what its result needs to be read (all in association order)."""

    problem: StructuredProblem
    bands: tuple[str, ...]
    reference_bands: tuple[str, ...]
    visit_band: np.ndarray  # (visits,) band index of each visit
    measurement_band: np.ndarray  # (m,) band index of each measurement
    band_detector: np.ndarray  # (k, 2) (band index, detector index) of each "band_detector" group
    valid: np.ndarray  # (m,) bool: usable by the model
    has_reference: np.ndarray  # (S, bands) bool: reference flux used
    counts: dict[str, int]
    reference_colour: np.ndarray | None  # (S, bands) colour of each band's colour term
    colour_applied: np.ndarray | None  # (S, bands) bool: star carried in the reference system

    @property
    def model(self) -> PhotometricTransform:
        return self.problem.mapping


@dataclass
class _References:
    """Reference fluxes per star and band, and the colour terms' part in them."""

    flux: np.ndarray  # (S, bands), NaN: none usable
    err: np.ndarray
    measured: np.ndarray  # (S, bands) bool: the star has a usable measurement in the band
    has: np.ndarray  # (S, bands) bool: reference flux used
    colour: np.ndarray | None = None
    applied: np.ndarray | None = None
    delta0: np.ndarray | None = None  # (S, bands) instrument - reference mag at the configured colour terms


def photometry_problem(data: InputData, assoc: Association, config: FitConfig, astrometry=None,
                       model: PhotometricTransform | None = None, mapping_filter=None) -> PhotometryProblem:
    """The photometric problem of `assoc` (see `jcal.calibration.photometry.fit_photometry` for the arguments)."""
    form = config.photometry_model
    rows = assoc.source_index
    bands, visit_band = bands_of(data, assoc)
    terms = colour_term_model(config, bands, data)  # None: no colour terms
    ref_bands = tuple(terms.primary[b] if terms is not None and terms.active[b] else reference_band(config, band, data)
                      for b, band in enumerate(bands))
    m_band = visit_band[assoc.visit_index]
    n_det = len(assoc.detectors)
    bd_keys, bd_index = np.unique(m_band * n_det + assoc.detector_index, return_inverse=True)
    bd_index = bd_index.reshape(-1)
    bd_band, bd_detector = bd_keys // n_det, bd_keys % n_det

    kind = model.kind if model is not None else ("magnitude" if form.endswith("magnitude") else "flux")
    inst_flux = data.sources.inst_flux[rows]
    valid, err, counts = _usable_measurements(data, assoc, config, kind)
    refs = _reference_constraints(data, assoc, terms, bands, ref_bands, kind, valid, m_band, counts)
    counts["reference_stars_collected"] = int(np.sum(np.any(
        np.stack([np.isfinite(np.asarray(data.refcat.fluxes[rb][0], float)) for rb in set(ref_bands)]), axis=0)))

    if model is None:
        # first-guess calibration: reference flux (in the instrument band) / instFlux
        star_ref_flux = refs.flux[assoc.star, m_band] * 10.0 ** (-0.4 * refs.delta0[assoc.star, m_band])
        ratio_ok = valid & np.isfinite(star_ref_flux) & (inst_flux > 0) & (star_ref_flux > 0)
        ratio = np.where(ratio_ok, star_ref_flux / np.where(inst_flux > 0, inst_flux, 1.0), np.nan)
        calib_k, calib_v = initial_calibration(assoc, m_band, visit_band, ratio_ok, ratio, len(bands))
        focal = center = half = None
        if form.startswith("constrained"):
            focal = focal_plane_map(data, assoc, config, astrometry)
            center, half = focal_domain(data, assoc, focal)
        fields = (detector_fields(data, assoc, bd_detector, config.photometry_detector_order)
                  if form.startswith("constrained") else None)
        model = initial_photometric_model(form, calib_k, calib_v, assoc, bd_index, bd_band, bd_detector, visit_band,
                                          len(bands), focal, center, half, config.photometry_visit_order, fields)
    if terms is not None and not isinstance(model, WithColourTerms):
        model = WithColourTerms(model, terms)
    if isinstance(model, WithColourTerms) and mapping_filter is None and not any(model.colour.fitted):
        mapping_filter = freeze_colour_slope(jm.parameter_filter(model))  # fixed coefficients: data

    index = {"star": assoc.star, "visit": assoc.visit_index, "detector": assoc.detector_index,
             "ccd_visit": assoc.ccd_visit_index, "band_detector": bd_index}
    mdata, residual = _measurement_data(data, assoc, config, model.kind, valid, err, m_band, refs)
    star_data, ref_value = _star_data(model.kind, refs)
    stars = _initial_stars(model, index, mdata, inst_flux, valid, m_band, assoc, refs, ref_value, len(bands))
    problem = StructuredProblem(residual, reference_photometry_residual, model, stars, mdata, star_data, index,
                                unit_vectors(assoc.star_ra, assoc.star_dec), prior_dof=refs.has.sum(axis=1).astype(float),
                                mapping_filter=mapping_filter)
    return PhotometryProblem(problem, bands, ref_bands, visit_band, m_band, np.stack([bd_band, bd_detector], axis=1),
                             valid, refs.has, counts, refs.colour, refs.applied)


def _usable_measurements(data: InputData, assoc: Association, config: FitConfig, kind: str):
    """(valid (m,) bool, flux error with the pedestal (m,), counts): measurements the model can use."""
    rows = assoc.source_index
    n = len(rows)
    inst_flux, inst_err = data.sources.inst_flux[rows], data.sources.inst_flux_err[rows]
    err = np.sqrt(inst_err**2 + (config.flux_pedestal * inst_flux) ** 2)
    valid = np.isfinite(inst_flux) & (err > 0)
    if kind == "magnitude":
        valid &= inst_flux > 0
    counts = {"dropped_nonpositive_flux": int(n - valid.sum())}
    if counts["dropped_nonpositive_flux"]:
        log.warning("photometry: %d measurement(s) with instFlux <= 0 dropped (a magnitude model cannot use them)",
                    counts["dropped_nonpositive_flux"])
    if not valid.any():
        raise InputError("photometry: no measurement has a usable instFlux")
    return valid, err, counts


def _reference_constraints(data: InputData, assoc: Association, terms, bands, ref_bands, kind: str,
                           valid: np.ndarray, m_band: np.ndarray, counts: dict) -> _References:
    """Reference fluxes per star and band, used where the star is measured in that band; with colour
    terms, only references with a colour, errors propagated. Counts what was lost in `counts`."""
    n_bands = len(bands)
    ref_flux, ref_err = reference_fluxes(data, assoc, ref_bands, kind)
    measured = np.zeros((assoc.n_stars, n_bands), bool)
    measured[assoc.star[valid], m_band[valid]] = True
    colour = applied = None
    delta0 = np.zeros((assoc.n_stars, n_bands))
    if terms is not None:
        colour, has_colour = reference_colours(data, assoc, terms)
        lost = np.isfinite(ref_flux) & np.asarray(terms.active)[None, :] & ~has_colour
        counts["reference_without_colour"] = int(np.any(lost & measured, axis=1).sum())
        if counts["reference_without_colour"]:
            log.warning("photometry: %d reference star(s) lack a usable secondary-band flux for their colour term: "
                        "no reference constraint for them in those bands", counts["reference_without_colour"])
        ref_err = np.where(lost, np.nan, colour_term_errors(data, assoc, terms, colour, ref_flux, ref_err))
        ref_flux = np.where(lost, np.nan, ref_flux)
    has_ref = np.isfinite(ref_flux) & measured
    for b, band in enumerate(bands):
        if not has_ref[:, b].any():
            colour_note = (f" (and, for its colour term, a usable {terms.secondary[b]!r} flux)"
                           if terms is not None and terms.active[b] else "")
            raise InputError(f"photometry: no star measured in band {band!r} matches a reference star with a "
                             f"usable {ref_bands[b]!r} flux{colour_note}: the calibration's absolute level is "
                             "undefined")
    if terms is not None:
        check_colour_spread(terms, colour, has_ref, bands)
        applied = has_ref & np.asarray(terms.active)[None, :]
        delta0 = np.where(applied, np.asarray(terms.offset) + np.asarray(terms.slope) * colour
                          + np.asarray(terms.curvature) * colour**2, 0.0)
    informative = informative_measurements(assoc.star, m_band, valid, has_ref)
    counts["uninformative_measurements"] = int(np.sum(valid & ~informative))
    if counts["uninformative_measurements"]:
        log.info("photometry: %d measurement(s) are the only one of their star in their band, without a reference "
                 "flux: they cannot constrain the calibration (the model is unconstrained where only such "
                 "measurements exist)", counts["uninformative_measurements"])
    return _References(ref_flux, ref_err, measured, has_ref, colour, applied, delta0)


def _measurement_data(data: InputData, assoc: Association, config: FitConfig, kind: str, valid, err, m_band,
                      refs: _References):
    """(per-measurement data of the residual, the residual function) for a model of `kind`."""
    rows = assoc.source_index
    n = len(rows)
    inst_flux = data.sources.inst_flux[rows]
    safe_flux = np.where(valid, inst_flux, 1.0)
    mdata = {"x": data.sources.x[rows], "y": data.sources.y[rows], "band": m_band}
    if kind == "flux":
        mdata.update(inst_flux=safe_flux, err=np.where(valid, err, 1.0), c_fixed=np.ones(n), live=np.ones(n))
        residual = flux_residual
    else:
        mdata["inst_mag"] = -2.5 * np.log10(np.where(safe_flux > 0, safe_flux, 1.0))
        mdata["sigma"] = np.where(valid, np.sqrt((MAG_PER_FRACTION * err / safe_flux) ** 2
                                                 + config.magnitude_pedestal**2), 1.0)
        residual = magnitude_residual
    if refs.applied is not None:  # colour-transformed stars: measurements compare with s' + delta(colour)
        mdata.update(colour=refs.colour[assoc.star, m_band], colour_on=refs.applied[assoc.star, m_band].astype(float))
    return mdata, residual


def _star_data(kind: str, refs: _References):
    """(per-star reference constraints in the model's units, the reference values)."""
    if kind == "flux":
        ref_value, ref_sigma = refs.flux, refs.err
    else:
        with np.errstate(divide="ignore", invalid="ignore"):
            ref_value = AB_ZERO_POINT_NJY - 2.5 * np.log10(refs.flux)
            ref_sigma = MAG_PER_FRACTION * refs.err / refs.flux
    has_ref = refs.has
    return ({"value": np.where(has_ref, ref_value, 0.0), "err": np.where(has_ref, ref_sigma, 1.0),
             "has": has_ref.astype(float)}, ref_value)


def _initial_stars(model, index, mdata, inst_flux, valid, m_band, assoc: Association, refs: _References, ref_value,
                   n_bands: int) -> PhotometricStars:
    """Stars start at their mean calibrated flux (or magnitude) in each band, at the starting model."""
    kind = model.kind
    idx_j = {k: jnp.asarray(v) for k, v in index.items() if k != "star"}
    c0, z0 = (np.asarray(a) for a in evaluate_calibration(model, idx_j, jnp.asarray(mdata["x"]), jnp.asarray(mdata["y"])))
    per_meas = inst_flux * c0 if kind == "flux" else mdata["inst_mag"] + z0
    key = assoc.star * n_bands + m_band
    total = np.bincount(key[valid], weights=per_meas[valid], minlength=assoc.n_stars * n_bands)
    num = np.bincount(key[valid], minlength=assoc.n_stars * n_bands)
    mean = (total / np.maximum(num, 1)).reshape(assoc.n_stars, n_bands)
    # colour-transformed stars are carried in the reference system (docs/photometry.md)
    delta0 = refs.delta0
    mean = mean - delta0 if kind == "magnitude" else mean * 10.0 ** (0.4 * delta0)
    default = np.where(refs.has, ref_value, 1.0 if kind == "flux" else 25.0)
    return PhotometricStars(value=jnp.asarray(np.where(refs.measured, mean, default)), kind=kind)
