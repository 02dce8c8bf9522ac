"""The photometric fit: association in, fitted calibration model and star fluxes out.

It mirrors `jcal.calibration.astrometry`: the same structured Gauss-Newton solver, the same stages
(constrained models: visit fields only, then the whole model; then the star fluxes; then
everything), the same leave-one-out outlier rejection rounds. Model forms are in
`jcal_models.photometry`; the set-up (bands, reference fluxes, colour terms, starting model) is in
`photometry_setup`, the fitted model (`PhotometricSolution`, save and reload) in
`jcal.photometry_solution`. The residuals, the flux-error conventions (`flux_errors`: "minimum"
or jointcal's fixed point), colour terms and the gauge are explained in `docs/photometry.md`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

import jcal_models as jm
from jcal_models.photometry import (AB_ZERO_POINT_NJY, ConstrainedFlux, ConstrainedMagnitude, PhotometricStars,
                                    PhotometricTransform, WithColourTerms, base_form, freeze_colour_slope)

from ..associate import Association
from ..sky import unit_vectors
from ..config import FitConfig
from ..data import InputData, InputError
from ..jax_setup import ensure_configured
from ..solver import FitState, SingularSystemError, Solver, StructuredProblem
from ..photometry_solution import PhotometricSolution, _evaluate, _local_means
from ..photometry_solution import load_photometric_model, save_photometric_model  # noqa: F401 - re-exported
from .photometry_setup import (MAG_PER_FRACTION, _bands, _check_colour_spread, _colour_term_errors,
                               _colour_term_model, _detector_fields, _focal_domain, _informative,
                               _initial_calibration, _reference_band, _reference_colours, _reference_fluxes,
                               focal_plane_map, initial_photometric_model)

log = logging.getLogger("jcal.calibration.photometry")

GRID = 8  # samples per axis of a detector for photo_calib_grid.parquet
MEAN_GRID = 16  # samples per axis for the mean calibration over a detector
BRIGHT_SNR = 100.0  # repeatability uses measurements above this S/N
MAX_ERROR_REFRESHES = 30  # flux models: refresh-and-solve rounds towards the fixed point


# --------------------------------------------------------------------------------------------
# Residuals
# --------------------------------------------------------------------------------------------


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



# --------------------------------------------------------------------------------------------
# The fit result
# --------------------------------------------------------------------------------------------


@dataclass
class PhotometryFit:
    """Everything the photometric fit produced."""

    model: PhotometricTransform  # fitted pixel -> calibration model (full, with group axes)
    stars: PhotometricStars
    solution: PhotometricSolution
    data: InputData
    association: Association
    solver: Solver
    state: FitState
    mapping_mask: jax.Array
    star_mask: np.ndarray  # (S, bands)
    index: dict[str, np.ndarray]
    bands: tuple[str, ...]
    reference_bands: tuple[str, ...]
    measurement_band: np.ndarray  # (m,) band index of each measurement
    valid: np.ndarray  # (m,) bool: usable by the model (instFlux > 0 for magnitude models)
    has_reference: np.ndarray  # (S, bands) bool: reference flux used
    chi2: float
    ndof: int
    counts: dict[str, int] = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    reference_colour: np.ndarray | None = None  # (S, bands) colour of each band's colour term, 0: none
    colour_applied: np.ndarray | None = None  # (S, bands) bool: star carried in the reference system
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def kind(self) -> str:
        return self.model.kind

    @property
    def weights(self) -> np.ndarray:
        """(m,) 1 for measurements used, 0 for rejected outliers and dropped ones (association order)."""
        return np.asarray(self.state.weights)[: self.association.n_measurements]

    @property
    def star_weights(self) -> np.ndarray:
        """(S,) 1 where the star's reference fluxes are used (0: rejected, or none)."""
        return np.asarray(self.state.star_weights)[: self.association.n_stars]

    # -- evaluation ------------------------------------------------------------------------------
    def calibration(self, visit, detector, x, y) -> np.ndarray:
        """nJy per count at 0-based pixels of detector-visits given by id (vectorised, broadcast)."""
        return self.solution.calibration(visit, detector, x, y)

    def zero_point(self, visit, detector, x, y) -> np.ndarray:
        return self.solution.zero_point(visit, detector, x, y)

    def _measurement_calibration(self) -> np.ndarray:
        if "meas_calib" not in self._cache:
            idx = {k: jnp.asarray(v) for k, v in self.index.items() if k != "star"}
            rows = self.association.source_index
            c, _ = _evaluate(self.model, idx, jnp.asarray(self.data.sources.x[rows]),
                             jnp.asarray(self.data.sources.y[rows]))
            self._cache["meas_calib"] = np.asarray(c)
        return self._cache["meas_calib"]

    def informative(self) -> np.ndarray:
        """(m,) bool: unrejected measurements that constrain the calibration (their star has another
        unrejected measurement in the band, or a reference flux there)."""
        used = self.weights > 0
        ref = self.has_reference & (self.star_weights[:, None] > 0)
        return _informative(self.association.star, self.measurement_band, used, ref)

    def chi2_per_measurement(self) -> np.ndarray:
        return self.solver.chi2(self.state)[0]

    # -- colour terms ----------------------------------------------------------------------------
    def colour_delta(self) -> np.ndarray:
        """(S, bands) instrument minus reference magnitude of each star at the fitted colour terms,
        0 where no colour term applies (no term in the band, or no reference colour)."""
        shape = np.shape(self.stars.value)
        if not isinstance(self.model, WithColourTerms) or self.colour_applied is None:
            return np.zeros(shape)
        c, col = self.model.colour, self.reference_colour
        delta = (np.asarray(c.offset)[None, :] + np.asarray(c.slope)[None, :] * col
                 + np.asarray(c.curvature)[None, :] * col**2)
        return np.where(self.colour_applied, delta, 0.0)

    def instrument_star_values(self) -> tuple[np.ndarray, np.ndarray]:
        """(S, bands) fitted star values in the instrument band (the fit carries colour-transformed
        stars in the reference system) and the factor (S, bands) that scales their errors."""
        value, delta = np.asarray(self.stars.value), self.colour_delta()
        if self.kind == "magnitude":
            return value + delta, np.ones_like(value)
        factor = 10.0 ** (-0.4 * delta)
        return value * factor, factor

    def colour_slope_errors(self) -> np.ndarray | None:
        """(bands,) 1-sigma error of each band's fitted c1 (mapping covariance, marginalised over the
        stars; 0 where c1 is fixed); None without colour terms."""
        if not isinstance(self.model, WithColourTerms):
            return None
        n_bands = len(self.bands)
        pm, _ = eqx.partition(self.state.mapping, self.solver.mapping_filter)
        if pm.colour.slope is None:  # fixed coefficients: not parameters of the fit
            return np.zeros(n_bands)
        marker = eqx.tree_at(lambda m: m.colour.slope, jax.tree.map(jnp.zeros_like, pm),
                             jnp.arange(1.0, n_bands + 1.0))
        where = np.asarray(self.solver.layout.flatten(marker))
        variance = np.diagonal(self.mapping_covariance())
        return np.array([np.sqrt(max(float(variance[np.flatnonzero(where == b + 1)[0]]), 0.0))
                         for b in range(n_bands)])

    def colour_term_summary(self) -> dict[str, dict[str, Any]]:
        """Per band with a colour term: coefficients (c1 with its error), whether c1 was fitted, and
        the reference stars that carried it (count, colour range)."""
        out = self.solution.colour_terms()
        if not out:
            return out
        used = self.colour_applied & (self.star_weights[:, None] > 0)
        for b, band in enumerate(self.bands):
            if band in out:
                col = self.reference_colour[used[:, b], b]
                out[band].update(n_reference_stars=int(col.size),
                                 reference_colour_range=[float(col.min()), float(col.max())] if col.size else [])
        return out

    def mapping_covariance(self) -> np.ndarray:
        """(N, N) covariance of the mapping parameters, marginalised over the stars (not rescaled by chi2/ndof)."""
        if "covariance" not in self._cache:
            self._cache["covariance"] = self.solver.covariance(self.state, self.mapping_mask, self.star_mask)
        return self._cache["covariance"]

    def _mean_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(k,) mean calibration over each detector-visit and its 1-sigma error from the fit covariance.

        The mean over a detector-visit depends only on the parameter groups it sees (its visit,
        detector, ...): its gradient is taken in that local view (jax.jacrev, vmapped over
        detector-visits, as the solver does per measurement) and scattered to the global columns.
        """
        if "mean" in self._cache:
            return self._cache["mean"]
        a = self.association
        grids = []
        for v, d in a.ccd_visits.tolist():
            cv = self.data.ccd_visits[(v, d)]
            gx = (np.arange(MEAN_GRID) + 0.5) / MEAN_GRID * cv.nx - 0.5  # cell centres over [-0.5, n - 0.5]
            gy = (np.arange(MEAN_GRID) + 0.5) / MEAN_GRID * cv.ny - 0.5
            grids.append(np.meshgrid(gx, gy))
        gx = jnp.asarray(np.stack([g[0].ravel() for g in grids]))  # (k, G)
        gy = jnp.asarray(np.stack([g[1].ravel() for g in grids]))
        index = self.solution.index(a.ccd_visits[:, 0], a.ccd_visits[:, 1])
        (pm, sm), _ = self.solver.split(self.state.mapping, self.state.stars)
        mean, jac = _local_means(pm, sm, index, gx, gy)
        mean, jac = np.asarray(mean), np.asarray(jac)
        layout = self.solver.layout
        if layout.size:
            cols = layout.columns(layout.group_index({k: np.asarray(v) for k, v in index.items()}, len(mean)))
            cov = self.mapping_covariance()
            var = np.einsum("kp,kpq,kq->k", jac, cov[cols[:, :, None], cols[:, None, :]], jac)
        else:
            var = np.zeros_like(mean)
        self._cache["mean"] = (mean, np.sqrt(np.maximum(var, 0.0)))
        return self._cache["mean"]

    def mean_calibration(self) -> dict[tuple[int, int], tuple[float, float, float]]:
        """(visit, detector) -> (mean nJy/count over the detector, its 1-sigma error, AB zero point
        31.4 - 2.5 log10(mean)). The error propagates the mapping covariance (marginalised over the
        stars, which carry the reference-flux errors) with the Jacobian of the mean (jax.jacfwd)."""
        mean, err = self._mean_arrays()
        zp = AB_ZERO_POINT_NJY - 2.5 * np.log10(mean)
        return {(int(v), int(d)): (float(m), float(e), float(z))
                for (v, d), m, e, z in zip(self.association.ccd_visits.tolist(), mean, err, zp)}

    # -- tables ----------------------------------------------------------------------------------
    def measurement_columns(self) -> dict[str, np.ndarray]:
        """Per measurement, aligned with `association` order: calibrated flux and AB magnitude."""
        a = self.association
        src = self.data.sources
        rows = a.source_index
        c = self._measurement_calibration()
        flux = src.inst_flux[rows] * c
        flux_err = src.inst_flux_err[rows] * c
        with np.errstate(divide="ignore", invalid="ignore"):
            mag = np.where(flux > 0, AB_ZERO_POINT_NJY - 2.5 * np.log10(np.where(flux > 0, flux, 1.0)), np.nan)
            mag_err = np.where(flux > 0, MAG_PER_FRACTION * flux_err / flux, np.nan)
        # residual against the fitted star (instrument band), in mag (the report maps it per visit)
        star_value = self.instrument_star_values()[0][a.star, self.measurement_band]
        with np.errstate(divide="ignore", invalid="ignore"):
            star_mag = star_value if self.kind == "magnitude" else \
                AB_ZERO_POINT_NJY - 2.5 * np.log10(np.where(star_value > 0, star_value, np.nan))
        return {"calib_flux": flux, "calib_flux_err": flux_err, "calib_mag": mag, "calib_mag_err": mag_err,
                "residual_mag": mag - star_mag,
                "photometry_calibration": c, "photometry_chi2": self.chi2_per_measurement(),
                "photometry_outlier": self.valid & (self.weights == 0),
                "photometry_used": self.weights > 0, "photometry_informative": self.informative()}

    def star_columns(self) -> dict[str, np.ndarray]:
        """Fitted flux (nJy) and AB magnitude of every star in every band, with errors (conditional on
        the fitted calibration); NaN where the star has no measurement in the band."""
        value, error_scale = self.instrument_star_values()
        cov = self.solver.star_covariance(self.state, self.star_mask)
        err = np.sqrt(np.maximum(np.diagonal(cov, axis1=1, axis2=2), 0.0)) * error_scale
        fitted = self.star_mask > 0
        n = np.zeros(value.shape, np.int64)
        used = self.weights > 0
        np.add.at(n, (self.association.star[used], self.measurement_band[used]), 1)
        out: dict[str, np.ndarray] = {}
        for b, band in enumerate(self.bands):
            v, e = value[:, b], err[:, b]
            if self.kind == "flux":
                flux, flux_err = v, e
                with np.errstate(divide="ignore", invalid="ignore"):
                    mag = np.where(v > 0, AB_ZERO_POINT_NJY - 2.5 * np.log10(np.abs(v)), np.nan)
                    mag_err = MAG_PER_FRACTION * e / np.abs(v)
            else:
                mag, mag_err = v, e
                flux = 10.0 ** (-0.4 * (v - AB_ZERO_POINT_NJY))
                flux_err = flux * e / MAG_PER_FRACTION
            for name, col in (("flux", flux), ("flux_err", flux_err), ("mag", mag), ("mag_err", mag_err)):
                out[f"{name}_{band}" if not name.endswith("_err") else f"{name[:-4]}_{band}_err"] = \
                    np.where(fitted[:, b], col, np.nan)
            out[f"n_photometry_{band}"] = n[:, b]
        return out

    # -- metrics ---------------------------------------------------------------------------------
    def repeatability_mmag(self) -> float:
        """RMS (mmag) of calibrated magnitudes of bright (S/N > 100) measurements about their star's
        mean in that band, over stars with >= 2 such measurements (sum of squares / sum of (n - 1))."""
        a = self.association
        src = self.data.sources
        rows = a.source_index
        snr = src.inst_flux[rows] / src.inst_flux_err[rows]
        mag = self.measurement_columns()["calib_mag"]
        use = (self.weights > 0) & (snr > BRIGHT_SNR) & np.isfinite(mag)
        key = a.star[use] * len(self.bands) + self.measurement_band[use]
        if key.size == 0:
            return float("nan")
        groups, inv, cnt = np.unique(key, return_inverse=True, return_counts=True)
        mean = np.bincount(inv, weights=mag[use]) / cnt
        dev2 = (mag[use] - mean[inv]) ** 2
        dof = float(np.sum(cnt[cnt >= 2] - 1))
        if dof <= 0:
            return float("nan")
        return float(np.sqrt(np.sum(dev2[(cnt >= 2)[inv]]) / dof) * 1000.0)

    def metrics(self) -> dict[str, Any]:
        state = self.state
        has_ref_star = self.has_reference.any(axis=1)
        seen = np.bincount(self.association.star, weights=self.valid.astype(float),
                           minlength=self.association.n_stars) > 0
        return {
            "photometry_collected_refStars": int(self.counts.get("reference_stars_collected", 0)),
            "photometry_prepared_refStars": int(has_ref_star.sum()),
            "photometry_matched_fittedStars": int(has_ref_star.sum()),
            "photometry_prepared_fittedStars": int(seen.sum()),
            "photometry_prepared_ccdImages": int(len(self.association.ccd_visits)),
            "photometry_final_chi2": self.chi2,
            "photometry_final_ndof": self.ndof,
            "photometry_chi2_per_ndof": self.chi2 / max(self.ndof, 1),
            "photometry_model": type(base_form(self.model)).__name__,
            "photometry_bands": list(self.bands),
            "photometry_reference_bands": list(self.reference_bands),
            "photometry_colour_terms": self.colour_term_summary(),
            "photometry_reference_without_colour": int(self.counts.get("reference_without_colour", 0)),
            "photometry_repeatability_mmag": self.repeatability_mmag(),
            "photometry_iterations": len(state.history),
            "photometry_outliers": state.n_outliers,
            "photometry_reference_outliers": state.n_reference_outliers,
            "photometry_dropped_nonpositive_flux": int(self.counts.get("dropped_nonpositive_flux", 0)),
            "photometry_uninformative_measurements": int(np.sum((self.weights > 0) & ~self.informative())),
            "photometry_suspect_ccdImages": int(self.counts.get("suspect_ccd_visits", 0)),
            "photometry_converged": state.converged,
            "photometry_stage_seconds": dict(self.stage_seconds),
            "photometry_sizes": self.solver.sizes,
            "photometry_chi2_history": [h["chi2"] for h in state.history],
        }

    # -- output ----------------------------------------------------------------------------------
    def calibration_table(self) -> dict[str, np.ndarray]:
        """Per detector-visit: mean calibration (nJy/count) over the detector, its error, zero point."""
        a = self.association
        mean, err = self._mean_arrays()
        vi = np.searchsorted(a.visits, a.ccd_visits[:, 0])
        return {"visit": a.ccd_visits[:, 0], "detector": a.ccd_visits[:, 1],
                "band": np.array([self.bands[b] for b in self.solution.visit_band[vi]], dtype=str),
                "calib_mean": mean, "calib_err": err, "zero_point": AB_ZERO_POINT_NJY - 2.5 * np.log10(mean),
                "zero_point_err": MAG_PER_FRACTION * err / mean}

    def calibration_grid(self, grid: int = GRID) -> dict[str, np.ndarray]:
        """The fitted calibration on a grid x grid of pixels (detector edges included) per detector-visit."""
        a = self.association
        cols: dict[str, list] = {"visit": [], "detector": [], "x": [], "y": []}
        for v, d in a.ccd_visits.tolist():
            cv = self.data.ccd_visits[(v, d)]
            x, y = np.meshgrid(np.linspace(-0.5, cv.nx - 0.5, grid), np.linspace(-0.5, cv.ny - 0.5, grid))
            cols["visit"].append(np.full(x.size, v))
            cols["detector"].append(np.full(x.size, d))
            cols["x"].append(x.ravel())
            cols["y"].append(y.ravel())
        out = {k: np.concatenate(v) for k, v in cols.items()}
        out["calibration"], out["zero_point"] = self.solution.evaluate(out["visit"], out["detector"], out["x"],
                                                                        out["y"])
        return out

    def write(self, out_dir: str | Path) -> None:
        """photo_calib.parquet, photo_calib_grid.parquet (constrained models), photometry_model.{json,eqx}."""
        out_dir = Path(out_dir)
        _write_parquet(out_dir / "photo_calib.parquet", self.calibration_table())
        if isinstance(base_form(self.model), (ConstrainedFlux, ConstrainedMagnitude)):
            _write_parquet(out_dir / "photo_calib_grid.parquet", self.calibration_grid())
        self.solution.save(out_dir / "photometry_model")


def _write_parquet(path: Path, columns: dict[str, np.ndarray]) -> None:
    pq.write_table(pa.table({k: np.asarray(v) for k, v in columns.items()}), path)


# --------------------------------------------------------------------------------------------
# The fit
# --------------------------------------------------------------------------------------------


def fit_photometry(data: InputData, assoc: Association, config: FitConfig, astrometry=None, *,
                   model: PhotometricTransform | None = None, mapping_filter=None, progress=None) -> PhotometryFit:
    """Staged Gauss-Newton photometric fit with outlier rejection (jointcal's recipe, vectorised), see
    `_fit_photometry`; detector fields consistent with 0 are dropped and the fit redone without them
    (`detector_fields_significant`)."""
    fit = _fit_photometry(data, assoc, config, astrometry, model=model, mapping_filter=mapping_filter,
                          progress=progress)
    if model is None and config.photometry_detector_order > 0 and not detector_fields_significant(fit):
        log.info("photometry: the detector fields are consistent with 0: refitting without them")
        # from the fitted model less its detector fields: the rest is nearly converged already
        start = fit.model
        if isinstance(start, WithColourTerms):
            start = dataclasses.replace(start, base=dataclasses.replace(start.base, detector_field=None))
        else:
            start = dataclasses.replace(start, detector_field=None)
        fit = _fit_photometry(data, assoc, config.replace(photometry_detector_order=0), astrometry, model=start,
                              mapping_filter=mapping_filter, progress=progress)
    return fit


def _fit_photometry(data: InputData, assoc: Association, config: FitConfig, astrometry=None, *,
                    model: PhotometricTransform | None = None, mapping_filter=None, progress=None) -> PhotometryFit:
    """The photometric fit of `fit_photometry`.

    astrometry: an `AstrometryFit` whose model's chip part gives focal-plane positions (optional).
    model: a starting model of any photometric form (default: built from the data as
        `config.photometry_model` says); its groups must follow `assoc`'s order (and
        "band_detector" the order of unique (band index, detector index) pairs).
    """
    ensure_configured()  # 64-bit floats, before any array is made
    t_start = time.perf_counter()
    form = config.photometry_model
    src = data.sources
    rows = assoc.source_index
    n = len(rows)
    bands, visit_band = _bands(data, assoc)
    n_bands = len(bands)
    terms = _colour_term_model(config, bands, data)  # None: no colour terms
    ref_bands = tuple(terms.primary[b] if terms is not None and terms.active[b] else _reference_band(config, band, data)
                      for b, band in enumerate(bands))
    m_band = visit_band[assoc.visit_index]
    n_det = len(assoc.detectors)
    bd_keys, bd_index = np.unique(m_band * n_det + assoc.detector_index, return_inverse=True)
    bd_index = bd_index.reshape(-1)
    bd_band, bd_detector = bd_keys // n_det, bd_keys % n_det

    kind = model.kind if model is not None else ("magnitude" if form.endswith("magnitude") else "flux")
    inst_flux, inst_err = src.inst_flux[rows], src.inst_flux_err[rows]
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

    # reference fluxes, per star and band; used where the star is measured in that band
    ref_flux, ref_err = _reference_fluxes(data, assoc, ref_bands, kind)
    measured = np.zeros((assoc.n_stars, n_bands), bool)
    measured[assoc.star[valid], m_band[valid]] = True
    colour = applied = None
    delta0 = np.zeros((assoc.n_stars, n_bands))  # instrument - reference mag at the configured colour terms
    if terms is not None:  # a band with a colour term uses only references with a colour, errors propagated
        colour, has_colour = _reference_colours(data, assoc, terms)
        lost = np.isfinite(ref_flux) & np.asarray(terms.active)[None, :] & ~has_colour
        counts["reference_without_colour"] = int(np.any(lost & measured, axis=1).sum())
        if counts["reference_without_colour"]:
            log.warning("photometry: %d reference star(s) lack a usable secondary-band flux for their colour term: "
                        "no reference constraint for them in those bands", counts["reference_without_colour"])
        ref_err = np.where(lost, np.nan, _colour_term_errors(data, assoc, terms, colour, ref_flux, ref_err))
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
        _check_colour_spread(terms, colour, has_ref, bands)
        applied = has_ref & np.asarray(terms.active)[None, :]
        delta0 = np.where(applied, np.asarray(terms.offset) + np.asarray(terms.slope) * colour
                          + np.asarray(terms.curvature) * colour**2, 0.0)
    informative = _informative(assoc.star, m_band, valid, has_ref)
    counts["uninformative_measurements"] = int(np.sum(valid & ~informative))
    if counts["uninformative_measurements"]:
        log.info("photometry: %d measurement(s) are the only one of their star in their band, without a reference "
                 "flux: they cannot constrain the calibration (the model is unconstrained where only such "
                 "measurements exist)", counts["uninformative_measurements"])
    counts["reference_stars_collected"] = int(np.sum(np.any(
        np.stack([np.isfinite(np.asarray(data.refcat.fluxes[rb][0], float)) for rb in set(ref_bands)]), axis=0)))

    # first-guess calibration: reference flux (in the instrument band) / instFlux
    star_ref_flux = ref_flux[assoc.star, m_band] * 10.0 ** (-0.4 * delta0[assoc.star, m_band])
    ratio_ok = valid & np.isfinite(star_ref_flux) & (inst_flux > 0) & (star_ref_flux > 0)
    ratio = np.where(ratio_ok, star_ref_flux / np.where(inst_flux > 0, inst_flux, 1.0), np.nan)
    calib_k, calib_v = _initial_calibration(assoc, m_band, visit_band, ratio_ok, ratio, n_bands)

    if model is None:
        focal = center = half = None
        if form.startswith("constrained"):
            focal = focal_plane_map(data, assoc, config, astrometry)
            center, half = _focal_domain(data, assoc, focal)
        fields = (_detector_fields(data, assoc, bd_detector, config.photometry_detector_order)
                  if form.startswith("constrained") else None)
        model = initial_photometric_model(form, calib_k, calib_v, assoc, bd_index, bd_band, bd_detector, visit_band,
                                          n_bands, focal, center, half, config.photometry_visit_order, fields)
    if terms is not None and not isinstance(model, WithColourTerms):
        model = WithColourTerms(model, terms)
    if isinstance(model, WithColourTerms) and mapping_filter is None and not any(model.colour.fitted):
        mapping_filter = freeze_colour_slope(jm.parameter_filter(model))  # fixed coefficients: data
    kind = model.kind

    index = {"star": assoc.star, "visit": assoc.visit_index, "detector": assoc.detector_index,
             "ccd_visit": assoc.ccd_visit_index, "band_detector": bd_index}
    x, y = src.x[rows], src.y[rows]
    safe_flux = np.where(valid, inst_flux, 1.0)
    mdata = {"x": x, "y": y, "band": m_band}
    if kind == "flux":
        mdata.update(inst_flux=safe_flux, err=np.where(valid, err, 1.0), c_fixed=np.ones(n), live=np.ones(n))
        residual = flux_residual
    else:
        mdata["inst_mag"] = -2.5 * np.log10(np.where(safe_flux > 0, safe_flux, 1.0))
        mdata["sigma"] = np.where(valid, np.sqrt((MAG_PER_FRACTION * err / safe_flux) ** 2
                                                 + config.magnitude_pedestal**2), 1.0)
        residual = magnitude_residual
    if applied is not None:  # colour-transformed stars: measurements compare with s' + delta(colour)
        mdata.update(colour=colour[assoc.star, m_band], colour_on=applied[assoc.star, m_band].astype(float))

    # reference constraints in the model's units
    if kind == "flux":
        ref_value, ref_sigma = ref_flux, ref_err
    else:
        with np.errstate(divide="ignore", invalid="ignore"):
            ref_value = AB_ZERO_POINT_NJY - 2.5 * np.log10(ref_flux)
            ref_sigma = MAG_PER_FRACTION * ref_err / ref_flux
    star_data = {"value": np.where(has_ref, ref_value, 0.0), "err": np.where(has_ref, ref_sigma, 1.0),
                 "has": has_ref.astype(float)}

    # stars start at their mean calibrated flux (or magnitude) in each band
    idx_j = {k: jnp.asarray(v) for k, v in index.items() if k != "star"}
    c0, z0 = (np.asarray(a) for a in _evaluate(model, idx_j, jnp.asarray(x), jnp.asarray(y)))
    per_meas = inst_flux * c0 if kind == "flux" else mdata["inst_mag"] + z0
    key = assoc.star * n_bands + m_band
    total = np.bincount(key[valid], weights=per_meas[valid], minlength=assoc.n_stars * n_bands)
    num = np.bincount(key[valid], minlength=assoc.n_stars * n_bands)
    mean = (total / np.maximum(num, 1)).reshape(assoc.n_stars, n_bands)
    # colour-transformed stars are carried in the reference system (module docstring)
    mean = mean - delta0 if kind == "magnitude" else mean * 10.0 ** (0.4 * delta0)
    default = np.where(has_ref, ref_value, 1.0 if kind == "flux" else 25.0)
    stars = PhotometricStars(value=jnp.asarray(np.where(measured, mean, default)), kind=kind)

    star_xyz = unit_vectors(assoc.star_ra, assoc.star_dec)
    problem = StructuredProblem(residual, reference_photometry_residual, model, stars, mdata, star_data, index,
                                star_xyz, prior_dof=has_ref.sum(axis=1).astype(float), mapping_filter=mapping_filter)
    solver = Solver(problem)
    log.info("photometry (%s): %d measurements, %d stars (%d with reference), %d band(s), %d mapping + %d star "
             "parameters", type(model).__name__, int(valid.sum()), assoc.n_stars, int(has_ref.any(1).sum()),
             n_bands, solver.sizes["mapping_parameters"], solver.sizes["star_parameters"])

    pm_params, _ = eqx.partition(model, solver.mapping_filter)
    ones = jax.tree.map(jnp.ones_like, pm_params)
    mapping_mask = solver.mapping_mask(model.fix_gauge(ones))
    hold_colour = getattr(model, "hold_colour", None)  # colour terms move only with the stars
    stars_held_mask = mapping_mask * solver.mapping_mask(hold_colour(ones)) if hold_colour else mapping_mask

    state = solver.new_state(model, stars, valid.astype(float), has_ref.any(axis=1).astype(float))
    stage_seconds: dict[str, float] = {}

    def star_mask_now() -> np.ndarray:
        """(S, B): a star's band is fitted while it has an unrejected measurement or a used reference flux."""
        active = np.zeros((assoc.n_stars, n_bands))
        np.add.at(active, (assoc.star, m_band), state.weights[:n])
        return ((active > 0) | (has_ref & (state.star_weights[: assoc.n_stars, None] > 0))).astype(float)

    def refresh_errors(live: bool | None = None):
        """Flux models: freeze the error's calibration at the current model (and switch modes)."""
        if kind != "flux":
            return
        c, _ = _evaluate(state.mapping, idx_j, jnp.asarray(x), jnp.asarray(y))
        solver.set_data("c_fixed", np.abs(np.asarray(c)))
        if live is not None:
            solver.set_data("live", np.full(n, 1.0 if live else 0.0))

    def total_chi2() -> float:
        c_m, c_s = solver.chi2(state)
        return float(c_m.sum() + c_s.sum())

    def stage(name, fit_mapping, fit_stars, mmask):
        nonlocal state
        t0 = time.perf_counter()
        refresh_errors()
        try:
            state = solver.run_stage(state, name, fit_mapping=fit_mapping, fit_stars=fit_stars, mapping_mask=mmask,
                                     star_mask=star_mask_now(), max_iterations=config.max_iterations,
                                     tolerance=config.tolerance, line_search=config.line_search)
        except SingularSystemError as exc:
            raise SingularSystemError(
                f"photometry ({form}): {exc}. With a constrained model, lower config.photometry_visit_order "
                f"(now {config.photometry_visit_order}) or use a simple_* model", exc.parameters) from exc
        stage_seconds[name] = stage_seconds.get(name, 0.0) + time.perf_counter() - t0
        if progress:
            progress(f"photometry {name}", state.history[-1]["chi2"] if state.history else float("nan"))

    first_stage = model.first_stage(ones)
    if first_stage is not None:  # visit fields only, detectors held
        stage("visits", True, False, mapping_mask * solver.mapping_mask(first_stage))
    stage("model", True, False, stars_held_mask)
    stage("stars", False, True, mapping_mask)

    def refit(current: FitState, name: str, fit_mapping: bool) -> FitState:
        nonlocal state
        state = current
        stage(name, fit_mapping, True, mapping_mask)
        return state

    state = solver.reject_gross(state, lambda st: refit(st, "stars", False), lambda st: star_mask_now(),
                                n_sigma=config.outlier_sigma, min_measurements=2,
                                max_rounds=config.max_outlier_rounds, label="photometry")
    stage("all", True, True, mapping_mask)
    state = solver.reject_until_clean(
        state, lambda st: refit(st, "all", True), lambda st: refit(st, "stars", False), lambda st: star_mask_now(),
        n_sigma=config.outlier_sigma, min_measurements=2, max_rounds=config.max_outlier_rounds, label="photometry")
    if kind == "flux" and config.flux_errors == "jointcal":  # errors held per solve, refreshed until nothing moves
        refresh_errors(live=False)
        for _ in range(MAX_ERROR_REFRESHES):
            refresh_errors()
            before = total_chi2()
            stage("all", True, True, mapping_mask)
            after = total_chi2()
            if abs(before - after) <= config.tolerance * max(after, 1e-300):
                break
        else:
            log.warning("photometry: flux errors not converged after %d refreshes", MAX_ERROR_REFRESHES)
        refresh_errors()
    star_mask = star_mask_now()
    chi2 = total_chi2()
    ndof = solver.ndof(state, mapping_mask, star_mask)
    stage_seconds["total"] = time.perf_counter() - t_start
    log.info("photometry: chi2 %.6g, ndof %d (chi2/ndof %.4g), %d outliers", chi2, ndof, chi2 / max(ndof, 1),
             state.n_outliers)
    solution = PhotometricSolution(state.mapping, assoc.visits, assoc.detectors, assoc.ccd_visits, bands, visit_band,
                                   np.stack([bd_band, bd_detector], axis=1))
    fit = PhotometryFit(state.mapping, solver.real_stars(state.stars), solution, data, assoc, solver, state,
                        mapping_mask, star_mask, index, bands, ref_bands, m_band, valid, has_ref, chi2, ndof, counts,
                        stage_seconds, reference_colour=colour, colour_applied=applied)
    if isinstance(state.mapping, WithColourTerms):
        fit.solution = dataclasses.replace(solution, colour_slope_errors=fit.colour_slope_errors())
        for band, t in fit.solution.colour_terms().items():
            log.info("photometry: colour term of band %s: c1 = %.5f +- %.5f (%s), c0 = %g, c2 = %g, colour %s - %s",
                     band, t["c1"], t["c1_err"], "fitted" if t["fitted"] else "fixed", t["c0"], t["c2"],
                     t["primary"], t["secondary"])
    _check_field(fit)
    return fit


DETECTOR_FIELD_SIGMA = 5.0  # detector fields are kept when they differ from 0 at this significance


def detector_fields_significant(fit: PhotometryFit) -> bool:
    """Whether the fitted detector fields (all together) differ from zero beyond noise: chi2 of their
    coefficients under their covariance against its dof + DETECTOR_FIELD_SIGMA sqrt(2 dof). Where they
    do not, they only add variance (they nearly trade with the visit fields' higher orders)."""
    model = fit.model
    where = ((lambda m: m.base.detector_field.inner.coeffs) if isinstance(model, WithColourTerms)
             else (lambda m: m.detector_field.inner.coeffs))
    if getattr(base_form(model), "detector_field", None) is None:
        return True
    params, _ = eqx.partition(model, fit.solver.mapping_filter)
    chosen = jax.tree.map(jnp.zeros_like, params)
    chosen = eqx.tree_at(where, chosen, jnp.ones_like(where(chosen)))
    sel = (fit.solver.mapping_mask(chosen) * np.asarray(fit.mapping_mask)) > 0
    if not sel.any():
        return True
    g = np.asarray(fit.solver.layout.flatten(params))[sel]
    chi2 = float(g @ np.linalg.pinv(fit.mapping_covariance()[np.ix_(sel, sel)], hermitian=True) @ g)
    dof = int(sel.sum())
    log.info("photometry: detector fields chi2 %.4g for %d coefficients", chi2, dof)
    return chi2 > dof + DETECTOR_FIELD_SIGMA * np.sqrt(2.0 * dof)


SUSPECT_RATIO = 1.5  # max / min calibration over a detector beyond which the field is called suspect


def _check_field(fit: PhotometryFit) -> None:
    """Warn about detector-visits where the fitted calibration is <= 0 or varies by more than
    SUSPECT_RATIO over the detector: a field unconstrained there (too high an order for the data)."""
    grid = fit.calibration_grid()
    k = np.repeat(np.arange(len(fit.association.ccd_visits)), GRID * GRID)
    c = grid["calibration"]
    lo = np.full(k.max() + 1, np.inf)
    hi = np.full(k.max() + 1, -np.inf)
    np.minimum.at(lo, k, c)
    np.maximum.at(hi, k, c)
    bad = (lo <= 0) | (hi > SUSPECT_RATIO * lo)
    fit.counts["suspect_ccd_visits"] = int(bad.sum())
    if bad.any():
        pairs = fit.association.ccd_visits[bad][:10].tolist()
        log.warning("photometry: on %d detector-visit(s) the fitted calibration is <= 0 or varies by more than a "
                    "factor %g over the detector (the field is unconstrained there; lower "
                    "config.photometry_visit_order): %s", int(bad.sum()), SUSPECT_RATIO,
                    ", ".join(f"(visit={v}, detector={d})" for v, d in pairs))
