"""Setting up a photometric fit: bands, reference fluxes and colour terms, the focal-plane map and
the starting calibration model (`initial_photometric_model`)."""

from __future__ import annotations

import logging

import jax.numpy as jnp
import numpy as np

import jcal_models as jm
from jcal_models.photometry import (AB_ZERO_POINT_NJY, ColourTerms, PhotometricTransform, colour_terms,
                                    constrained_flux, constrained_magnitude, detector_field, simple_flux,
                                    simple_magnitude)

from ..associate import Association
from ..solution import evaluate_model
from ..config import FitConfig
from ..data import InputData, InputError
from .initialise import initial_astrometric_model

log = logging.getLogger("jcal.calibration.photometry")

MAG_PER_FRACTION = 2.5 / np.log(10.0)  # 1.0857: d(mag) = MAG_PER_FRACTION * d(flux) / flux
MIN_COLOUR_SPREAD = 0.01  # mag: rms of a band's reference colours below which c1 cannot be fitted
MIN_COLOUR_STARS = 3  # reference stars with a colour needed to fit a band's c1


# --------------------------------------------------------------------------------------------
# Setting up
# --------------------------------------------------------------------------------------------


def bands_of(data: InputData, assoc: Association):
    """Band names, and the band index of each association visit."""
    order = np.argsort(data.visits.visit)
    pos = order[np.searchsorted(data.visits.visit, assoc.visits, sorter=order)]
    names = data.visits.band[pos]
    bands, visit_band = np.unique(names, return_inverse=True)
    return tuple(str(b) for b in bands), visit_band.reshape(-1).astype(np.int64)


def reference_band(config: FitConfig, band: str, data: InputData) -> str:
    ref_band = config.reference_band if config.reference_band is not None else band
    if ref_band not in data.refcat.fluxes:
        raise InputError(
            f"photometry: the reference catalog has no fluxes for band {ref_band!r} (visit band {band!r}; "
            f"config.reference_band = {config.reference_band!r}); it has {sorted(data.refcat.fluxes)}. "
            "Set config.reference_band to one of those, or turn photometry off")
    return ref_band


def reference_fluxes(data: InputData, assoc: Association, ref_bands, kind: str):
    """(S, B) reference flux and error [nJy], NaN where the star has none or it is unusable."""
    n_stars, n_bands = assoc.n_stars, len(ref_bands)
    flux, err = np.full((n_stars, n_bands), np.nan), np.full((n_stars, n_bands), np.nan)
    has = assoc.star_ref >= 0
    r = assoc.star_ref[has]
    for b, rb in enumerate(ref_bands):
        f, e = data.refcat.fluxes[rb]
        flux[has, b], err[has, b] = np.asarray(f, float)[r], np.asarray(e, float)[r]
    ok = np.isfinite(flux) & np.isfinite(err) & (err > 0)
    if kind == "magnitude":
        ok &= flux > 0
    return np.where(ok, flux, np.nan), np.where(ok, err, np.nan)


def colour_term_model(config: FitConfig, bands: tuple[str, ...], data: InputData) -> ColourTerms | None:
    """The configured colour terms of the fitted bands (None when no fitted band has one); their
    primary and secondary bands must be in the reference catalog."""
    terms = config.colour_terms
    unused = sorted(set(terms) - set(bands))
    if unused:
        log.info("photometry: colour terms configured for band(s) %s that no visit is in: unused", unused)
    if not any(b in terms for b in bands):
        return None
    available = sorted(data.refcat.fluxes)
    for band in bands:
        for role in ("primary", "secondary"):
            name = terms.get(band, {}).get(role)
            if name is not None and name not in data.refcat.fluxes:
                raise InputError(f"photometry: the colour term of band {band!r} needs reference fluxes in its {role} "
                                 f"band {name!r}, but the reference catalog has {available}; fix "
                                 "config.colour_terms or the reference catalog")
    get = lambda band, key, default: terms[band][key] if band in terms else default  # noqa: E731
    return colour_terms([get(b, "primary", "") for b in bands], [get(b, "secondary", "") for b in bands],
                        [get(b, "c0", 0.0) for b in bands], [get(b, "c1", 0.0) for b in bands],
                        [get(b, "c2", 0.0) for b in bands], [config.fit_colour_terms and b in terms for b in bands])


def reference_colours(data: InputData, assoc: Association, terms: ColourTerms):
    """(S, B) reference colour (primary - secondary, mag; 0 where none) and (S, B) bool: usable
    (matched reference star with positive, finite fluxes and errors in both bands)."""
    n_bands = len(terms.primary)
    colour, has = np.zeros((assoc.n_stars, n_bands)), np.zeros((assoc.n_stars, n_bands), bool)
    matched = assoc.star_ref >= 0
    r = assoc.star_ref[matched]
    for b in range(n_bands):
        if not terms.active[b]:
            continue
        (fp, ep), (fs, es) = (tuple(np.asarray(a, float)[r] for a in data.refcat.fluxes[name])
                              for name in (terms.primary[b], terms.secondary[b]))
        ok = np.isfinite(fp) & np.isfinite(fs) & (fp > 0) & (fs > 0) & np.isfinite(ep) & np.isfinite(es) \
            & (ep > 0) & (es > 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            col = -2.5 * np.log10(fp / fs)
        colour[matched, b], has[matched, b] = np.where(ok, col, 0.0), ok
    return colour, has


def colour_term_errors(data: InputData, assoc: Association, terms: ColourTerms, colour: np.ndarray,
                        ref_flux: np.ndarray, ref_err: np.ndarray) -> np.ndarray:
    """(S, B) error [nJy, reference system] of the colour-transformed reference flux of each band
    with a colour term: sigma_m^2 = ((1 + c1 + 2 c2 col) sigma_p)^2 + ((c1 + 2 c2 col) sigma_s)^2 at
    the configured coefficients, as a flux error F_p sigma_m / 1.0857. Other bands: unchanged."""
    out = ref_err.copy()
    matched = assoc.star_ref >= 0
    r = assoc.star_ref[matched]
    c1, c2 = np.asarray(terms.slope), np.asarray(terms.curvature)
    for b in np.flatnonzero(terms.active):
        fs, es = (np.asarray(a, float)[r] for a in data.refcat.fluxes[terms.secondary[b]])
        sigma_s = np.full(assoc.n_stars, np.nan)
        with np.errstate(divide="ignore", invalid="ignore"):
            sigma_s[matched] = MAG_PER_FRACTION * es / fs
            sigma_p = MAG_PER_FRACTION * ref_err[:, b] / ref_flux[:, b]
        d = c1[b] + 2.0 * c2[b] * colour[:, b]  # d delta / d colour
        sigma_m = np.hypot((1.0 + d) * sigma_p, d * sigma_s)
        out[:, b] = ref_flux[:, b] * sigma_m / MAG_PER_FRACTION
    return out


def check_colour_spread(terms: ColourTerms, colour: np.ndarray, has_ref: np.ndarray, bands) -> None:
    """InputError when a fitted c1 cannot be told from the zero point: too few reference stars with
    a colour, or all of nearly the same colour (c1 * colour is then a constant offset)."""
    for b, band in enumerate(bands):
        if not terms.fitted[b]:
            continue
        col = colour[has_ref[:, b], b]
        spread = float(np.std(col)) if col.size else 0.0
        if col.size < MIN_COLOUR_STARS or spread < MIN_COLOUR_SPREAD:
            raise InputError(
                f"photometry: cannot fit the colour term of band {band!r}: {col.size} reference star(s) with a "
                f"{terms.primary[b]} - {terms.secondary[b]} colour, spread (rms) {spread:.3g} mag; fitting c1 "
                f"needs >= {MIN_COLOUR_STARS} stars spreading >= {MIN_COLOUR_SPREAD} mag, else c1 x colour is a "
                "constant offset, degenerate with the zero points. Give c1 in config.colour_terms with "
                "fit_colour_terms=False, or use reference stars of different colours")


def focal_plane_map(data: InputData, assoc: Association, config: FitConfig, astrometry=None) -> jm.Grouped:
    """pixel -> focal plane per detector (Grouped by "detector", assoc.detectors order).

    The fitted astrometric model's chip part when it has one, else the chips of a constrained
    astrometric model fitted to the first-guess WCSs (affine; the focal frame is the visit
    tangent plane de-rotated, in degrees)."""
    model = getattr(astrometry, "model", None)
    chip = getattr(model, "chip", None)
    if isinstance(chip, jm.Grouped) and chip.by == "detector":
        return chip
    guess = initial_astrometric_model(data, assoc, config.replace(astrometry_model="constrained", chip_order=1,
                                                                  visit_order=1))
    return guess.chip


def focal_domain(data: InputData, assoc: Association, focal: jm.Grouped):
    """Centre and half-width of the bounding box of all detectors in the focal plane."""
    size = {}
    for (v, d), cv in data.ccd_visits.items():
        size.setdefault(int(d), (cv.nx, cv.ny))
    t = np.linspace(0.0, 1.0, 9)
    edge_u = np.concatenate([t, t, np.zeros_like(t), np.ones_like(t)])
    edge_v = np.concatenate([np.zeros_like(t), np.ones_like(t), t, t])
    xs, ys, ds = [], [], []
    for di, d in enumerate(assoc.detectors.tolist()):
        nx, ny = size[d]
        xs.append(edge_u * nx - 0.5)
        ys.append(edge_v * ny - 0.5)
        ds.append(np.full(edge_u.size, di))
    fx, fy = evaluate_model(focal, {"detector": jnp.asarray(np.concatenate(ds))}, jnp.asarray(np.concatenate(xs)),
                            jnp.asarray(np.concatenate(ys)))
    fx, fy = np.asarray(fx), np.asarray(fy)
    center = np.array([(fx.max() + fx.min()) / 2, (fy.max() + fy.min()) / 2])
    half = np.maximum(np.array([np.ptp(fx), np.ptp(fy)]) / 2, 1e-9) * 1.01
    return center, half


def detector_fields(data: InputData, assoc: Association, bd_detector: np.ndarray, order: int):
    """Zero detector fields of `order` over each band-detector's pixels (None for order 0)."""
    size = {}
    for (v, d), cv in data.ccd_visits.items():
        size.setdefault(int(d), (cv.nx, cv.ny))
    nxy = np.array([size[int(d)] for d in assoc.detectors[bd_detector]], float).reshape(-1, 2)
    return detector_field(len(bd_detector), (nxy - 1) / 2, nxy / 2, order)


def _median_by(values: np.ndarray, groups: np.ndarray, n: int) -> np.ndarray:
    """Median of `values` per group in [0, n); NaN for empty groups."""
    out = np.full(n, np.nan)
    if values.size == 0:
        return out
    order = np.lexsort((values, groups))
    g, v = groups[order], values[order]
    starts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
    ends = np.r_[starts[1:], g.size]
    for s, e in zip(starts, ends):
        out[g[s]] = np.median(v[s:e])
    return out


def initial_calibration(assoc, m_band, visit_band, ratio_ok, ratio, n_bands):
    """Per detector-visit first-guess calibration [nJy/count]: median of reference flux / instFlux over
    its measurements of reference stars; else its visit's, else its band's median."""
    k_of = assoc.ccd_visit_index
    n_k = len(assoc.ccd_visits)
    per_k = _median_by(ratio[ratio_ok], k_of[ratio_ok], n_k)
    per_v = _median_by(ratio[ratio_ok], assoc.visit_index[ratio_ok], len(assoc.visits))
    per_b = _median_by(ratio[ratio_ok], m_band[ratio_ok], n_bands)
    k_visit = np.searchsorted(assoc.visits, assoc.ccd_visits[:, 0])
    per_v = np.where(np.isfinite(per_v), per_v, per_b[visit_band])
    return np.where(np.isfinite(per_k), per_k, per_v[k_visit]), per_v


def _reference_detectors(bd_band: np.ndarray, k_group: np.ndarray, bd_index: np.ndarray) -> list[int]:
    """Per band, the band-detector group seen in most of the band's visits (then with most measurements).

    bd_band (g,) band of each group; k_group (k,) group of each detector-visit; bd_index (m,) of each
    measurement."""
    n_groups = len(bd_band)
    n_visits_seen = np.bincount(k_group, minlength=n_groups)
    n_meas = np.bincount(bd_index, minlength=n_groups)
    refs = []
    for b in range(int(bd_band.max()) + 1):
        groups = np.flatnonzero(bd_band == b)
        refs.append(int(groups[np.lexsort((-n_meas[groups], -n_visits_seen[groups]))[0]]))
    return refs


def initial_photometric_model(form: str, calib_k: np.ndarray, calib_v: np.ndarray, assoc: Association,
                              bd_index, bd_band, bd_detector, visit_band, n_bands, focal=None, focal_center=None,
                              focal_half=None, order: int = 7, detector_fields=None) -> PhotometricTransform:
    """Starting model from per detector-visit and per visit first-guess calibrations (`detector_fields`:
    zero `jcal_models.detector_field`s, or None, for constrained forms)."""
    if form == "simple_flux":
        return simple_flux(calib_k)
    if form == "simple_magnitude":
        return simple_magnitude(AB_ZERO_POINT_NJY - 2.5 * np.log10(calib_k))
    # constrained: detector factor = median over its visits of calib_k / calib_v, reference detector = 1
    k_visit = np.searchsorted(assoc.visits, assoc.ccd_visits[:, 0])
    k_det = np.searchsorted(assoc.detectors, assoc.ccd_visits[:, 1])
    n_det = len(assoc.detectors)
    bd_keys = bd_band * n_det + bd_detector
    k_group = np.searchsorted(bd_keys, visit_band[k_visit] * n_det + k_det)
    factor = _median_by(np.log(calib_k / calib_v[k_visit]), k_group, len(bd_keys))
    factor = np.where(np.isfinite(factor), factor, 0.0)
    refs = _reference_detectors(bd_band, k_group, bd_index)
    ref_factor = factor[refs]  # per band; reference detectors start at 1 (flux) / 0 (mag), visits compensate
    factor = factor - ref_factor[bd_band]
    log_visit = np.log(calib_v) + ref_factor[visit_band]
    n_terms = jm.n_terms(order)
    coeffs = np.zeros((len(assoc.visits), n_terms))
    center, half = np.tile(focal_center, (len(assoc.visits), 1)), np.tile(focal_half, (len(assoc.visits), 1))
    if form == "constrained_flux":
        coeffs[:, 0] = np.exp(log_visit)
        return constrained_flux(focal, np.exp(factor), coeffs, center, half, order, refs, detector_fields)
    coeffs[:, 0] = AB_ZERO_POINT_NJY - 2.5 * log_visit / np.log(10.0)
    return constrained_magnitude(focal, -2.5 * factor / np.log(10.0), coeffs, center, half, order, refs,
                                 detector_fields)


def informative_measurements(star: np.ndarray, band: np.ndarray, use: np.ndarray, has_ref: np.ndarray) -> np.ndarray:
    """(m,) bool: used measurements whose star has another used measurement in the band, or a
    reference flux there. The others only fix their own star's flux: no calibration information."""
    n_stars, n_bands = has_ref.shape
    n = np.zeros((n_stars, n_bands), np.int64)
    np.add.at(n, (star[use], band[use]), 1)
    return use & ((n[star, band] >= 2) | has_ref[star, band])


