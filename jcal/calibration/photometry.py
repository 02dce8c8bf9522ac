"""The photometric fit: association in, fitted calibration model and star fluxes out.

It mirrors `jcal.calibration.astrometry`: the same structured Gauss-Newton solver, the same stages
(constrained models: visit fields only, then the whole model; then the star fluxes; then
everything), the same leave-one-out outlier rejection rounds. Model forms are in
`jcal_models.photometry` (`config.photometry_model`: simple_flux, simple_magnitude,
constrained_flux, constrained_magnitude); the gauge of the constrained forms is one held
reference detector constant per band (`fix_gauge`).

Residual of measurement i (star s, band b, pixel (x, y) of detector-visit k):

- flux models:      r_i = (instFlux_i * c(x, y) - F_s,b) / sigma_i,
                    sigma_i = |c(x, y)| * err_i;
- magnitude models: r_i = (-2.5 log10(instFlux_i) + z(x, y) - m_s,b) / sigma_i,
                    sigma_i = sqrt((1.0857 * err_i / instFlux_i)^2 + magnitude_pedestal^2);
- err_i = sqrt(instFluxErr_i^2 + (flux_pedestal * instFlux_i)^2) for both.

The error of a flux model moves with the calibration. By default (`config.flux_errors =
"minimum"`) the fit minimises chi2 with the error evaluated live (sigma = |c| err, its
derivative in the Jacobian): the minimum of chi2, and an unbiased absolute level.
jointcal instead holds the error FIXED during each linear solve (its Jacobian ignores the
error's derivative) and so converges to a fixed point, not to the minimum of chi2; with
`flux_errors = "jointcal"` (the Task facade's default) jcal ends at that same fixed point: after
the outlier rounds the error's calibration is frozen (`c_fixed`), an "all" stage is solved with
it held, and freeze-and-solve repeats until chi2 no longer changes (to `config.tolerance`); on
cfht_minimal this reproduces jointcal's chi2 to 7 digits. The early stages and the outlier
rounds use the live error in both conventions. Reason: with the error held, shrinking every
calibration and star flux by a factor a < 1 lowers the measurement chi2 by a^2, which only the
reference fluxes resist; before gross outliers (mis-associations, chi2 ~ 1e5 each) are rejected
this pulls the whole solution down by > 10 %, the reference fluxes then look like outliers and
the fit collapses. The live error has no such pull. At jointcal's fixed point the pull remains
but is small: the absolute level sits low by ~ chi2_measurements / sum_refs (F_ref /
sigma_ref)^2 (0.1-0.5 % on the simulations) - a property of jointcal's convention that leaves
the relative calibration alone. Magnitude errors do not depend on the model.

Measurements with instFlux <= 0 cannot enter a magnitude model: they get weight 0 (logged,
counted in the metrics, never reported as outliers).

A star with a reference flux in the band (refcat band `config.reference_band` for every
band if set, else the visit's band name) adds (F_s,b - F_ref) / F_ref_err (flux models) or
(m_s,b - m_ref) / (1.0857 F_ref_err / F_ref) (magnitude models). A multi-band fit is one
problem, but the bands only share the star list: each band has its own star fluxes,
detector constants (group "band_detector") and gauge.

Colour terms (`config.colour_terms`, jointcal's colorterm library): for a band b with a term,
the reference magnitude is carried into the instrument band before it meets the fitted star,
m_ref,inst = m_ref(primary) + delta_b(colour), delta_b = c0 + c1 colour + c2 colour^2,
colour = m_ref(primary) - m_ref(secondary); its error propagates both bands' errors at the
configured coefficients, sigma^2 = ((1 + c1 + 2 c2 colour) sigma_p)^2 + ((c1 + 2 c2 colour) sigma_s)^2
(held during the fit). A star whose reference lacks a usable secondary flux gets NO reference
constraint in b (an untransformed one would bias the zero point by c1 x its unknown colour);
such stars are counted (``photometry_reference_without_colour``). With `fit_colour_terms`, c1 of
each such band is one GLOBAL mapping parameter (`jcal_models.WithColourTerms`) fitted jointly by
the same solver; c0 stays fixed (a common offset of all references of a band: the zero points'
own degeneracy) and c1 is informative only through reference stars of different colours, so a
band whose used reference colours spread by less than MIN_COLOUR_SPREAD (or has fewer than
MIN_COLOUR_STARS) raises `InputError` before fitting. The solver's reference constraints see
only their star, not the mapping, so the fit carries each such star in the REFERENCE system,
s' = s_inst - delta (flux: F' = F_inst 10^(0.4 delta)): the reference constraint becomes
(s' - m_ref(primary)) / sigma and the measurements compare with s' + delta. This is an exact,
per-star change of variables (same chi2, same minimum, same leave-one-out outlier scores) that
lets autodiff through the per-measurement residual give d(residual)/d(c1). Outputs
(stars.parquet, measurement residuals) are transformed back to the instrument band. c1 is held
in the stages where the stars are held (it is informative only when they move with it).

The focal-plane position used by constrained models is the chip part of the fitted
astrometric model when `astrometry` has one (`model.chip`, Grouped by "detector"), else
that of a constrained astrometric model fitted to the first-guess WCSs (affine per
detector, `jcal.calibration.initialise`): the first-guess WCSs always exist, whereas the optional
camera table has no pixel size or orientation. It is fixed data inside the model (a
`fixed_field`), so the model maps any pixel to a calibration on its own.

Where only measurements of stars seen once in a band (and without a reference flux) fall,
nothing constrains the calibration: a high-order field there follows whatever few
measurements tie it down (`PhotometryFit.informative`, metric
``photometry_uninformative_measurements``).
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
from jcal_models.photometry import (AB_ZERO_POINT_NJY, ColourTerms, ConstrainedFlux, ConstrainedMagnitude,
                                    PhotometricStars, PhotometricTransform, WithColourTerms, base_form,
                                    colour_terms, constrained_flux, constrained_magnitude, detector_field,
                                    freeze_colour_slope, simple_flux, simple_magnitude)

from ..associate import Association
from ..sky import unit_vectors
from ..solution import evaluate_model, read_solution
from ..config import FitConfig
from ..data import InputData, InputError
from ..jax_setup import ensure_configured
from ..solver import FitState, SingularSystemError, Solver, StructuredProblem
from ..solver.compile import brief_jit
from .initialise import initial_astrometric_model

log = logging.getLogger("jcal.calibration.photometry")

MAG_PER_FRACTION = 2.5 / np.log(10.0)  # 1.0857: d(mag) = MAG_PER_FRACTION * d(flux) / flux
GRID = 8  # samples per axis of a detector for photo_calib_grid.parquet
MEAN_GRID = 16  # samples per axis for the mean calibration over a detector
BRIGHT_SNR = 100.0  # repeatability uses measurements above this S/N
MAX_ERROR_REFRESHES = 30  # flux models: refresh-and-solve rounds towards the fixed point
MIN_COLOUR_SPREAD = 0.01  # mag: rms of a band's reference colours below which c1 cannot be fitted
MIN_COLOUR_STARS = 3  # reference stars with a colour needed to fit a band's c1


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
# A fitted photometric model with its ids: evaluate, save, reload
# --------------------------------------------------------------------------------------------


def _group_keys_used(model) -> set[str]:
    return set(jax.tree.leaves(jm.group_keys(model)))


# id lists of a saved photometric solution and the group key whose size each one gives
PHOTOMETRY_IDS = {"visits": "visit", "detectors": "detector", "ccd_visits": "ccd_visit",
                  "band_detectors": "band_detector"}


def _check_bands(document: dict, ids: dict[str, np.ndarray], file: Path) -> None:
    """A saved photometric solution's bands: names, one band per visit, band-detector rows in range."""
    bands, visit_band = document.get("bands"), document.get("visit_band")
    if not isinstance(bands, list) or not all(isinstance(b, str) for b in bands):
        raise InputError(f"{file}: 'bands' must be a list of band names")
    if (not isinstance(visit_band, list) or len(visit_band) != len(ids["visits"])
            or not all(type(b) is int and 0 <= b < len(bands) for b in visit_band)):
        raise InputError(f"{file}: 'visit_band' must give, per visit ({len(ids['visits'])}), an index into 'bands'")
    bd = ids["band_detectors"]
    if bd.size and (bd[:, 0].max() >= len(bands) or bd[:, 1].max() >= len(ids["detectors"]) or bd.min() < 0):
        raise InputError(f"{file}: 'band_detectors' rows must be (band index, detector index) within range")
    errors = document.get("colour_slope_errors")
    if errors is not None and (not isinstance(errors, list) or len(errors) != len(bands)):
        raise InputError(f"{file}: 'colour_slope_errors' must list one value per band")


@brief_jit
def _evaluate(model, index, x, y):
    """(calibration nJy/count, zero point AB mag) at arrays of pixels, measurement i in groups index[.][i]."""
    def one(idx, xi, yi):
        view = jm.gather(model, idx)
        value = view(xi, yi)
        if model.kind == "flux":
            return value, AB_ZERO_POINT_NJY - 2.5 * jnp.log10(value)
        return 10.0 ** (-0.4 * (value - AB_ZERO_POINT_NJY)), value

    return jax.vmap(one)(index, x, y)


@brief_jit
def _local_means(pm, sm, index, gx, gy):
    """Per detector-visit k: mean calibration over its grid (gx[k], gy[k]) and its gradient with
    respect to the fitted parameters of the groups it sees, flattened in layout order."""

    def one(idx, x, y):
        def mean(pm_view):
            view = eqx.combine(pm_view, jm.gather(sm, idx))
            return jnp.mean(jax.vmap(view.calibration)(x, y))

        pm_view = jm.gather(pm, idx)
        grads = jax.tree.leaves(jax.grad(mean)(pm_view))
        flat = jnp.concatenate([g.ravel() for g in grads]) if grads else jnp.zeros(0)
        return mean(pm_view), flat

    return jax.vmap(one)(index, gx, gy)


@dataclass(frozen=True)
class PhotometricSolution:
    """pixel -> calibration for every fitted detector-visit, addressed by visit and detector id."""

    model: PhotometricTransform
    visits: np.ndarray  # (v,) visit ids, in model group order
    detectors: np.ndarray  # (d,) detector ids
    ccd_visits: np.ndarray  # (k, 2) (visit, detector) ids
    bands: tuple[str, ...]  # band names
    visit_band: np.ndarray  # (v,) index into `bands`
    band_detectors: np.ndarray  # (g, 2) (band index, detector index) of each "band_detector" group
    colour_slope_errors: np.ndarray | None = None  # (bands,) 1-sigma error of each fitted c1 (0: fixed)

    def colour_terms(self) -> dict[str, dict[str, Any]]:
        """{band: {primary, secondary, c0, c1, c1_err, c2, fitted}} of the bands with a colour term."""
        if not isinstance(self.model, WithColourTerms):
            return {}
        c = self.model.colour
        errors = self.colour_slope_errors if self.colour_slope_errors is not None else np.zeros(len(self.bands))
        return {band: {"primary": c.primary[b], "secondary": c.secondary[b], "c0": float(c.offset[b]),
                       "c1": float(c.slope[b]), "c1_err": float(errors[b]), "c2": float(c.curvature[b]),
                       "fitted": bool(c.fitted[b])}
                for b, band in enumerate(self.bands) if c.active[b]}

    def index(self, visit, detector) -> dict[str, jax.Array]:
        """Group indices of (visit, detector) ids; KeyError for what the model cannot evaluate."""
        visit, detector = np.broadcast_arrays(np.asarray(visit, np.int64), np.asarray(detector, np.int64))
        visit, detector = visit.ravel(), detector.ravel()
        used = _group_keys_used(self.model)
        vi = np.clip(np.searchsorted(self.visits, visit), 0, len(self.visits) - 1)
        di = np.clip(np.searchsorted(self.detectors, detector), 0, len(self.detectors) - 1)
        ok_v, ok_d = self.visits[vi] == visit, self.detectors[di] == detector
        keys = self.ccd_visits[:, 0] * (1 << 32) + self.ccd_visits[:, 1]
        ki = np.clip(np.searchsorted(keys, visit * (1 << 32) + detector), 0, len(keys) - 1)
        ok_k = keys[ki] == visit * (1 << 32) + detector
        n_det = len(self.detectors)
        bd_keys = self.band_detectors[:, 0] * n_det + self.band_detectors[:, 1]
        want = self.visit_band[vi] * n_det + di
        gi = np.clip(np.searchsorted(bd_keys, want), 0, len(bd_keys) - 1)
        ok_g = bd_keys[gi] == want
        ok = np.ones(visit.shape, bool)
        if "ccd_visit" in used:
            ok &= ok_k
        if used & {"visit", "band_detector"}:
            ok &= ok_v
        if "detector" in used:
            ok &= ok_d
        if "band_detector" in used:
            ok &= ok_g
        if not np.all(ok):
            bad = np.flatnonzero(~ok)[0]
            raise KeyError(f"(visit, detector) = ({visit[bad]}, {detector[bad]}) cannot be evaluated: it was not "
                           "part of the photometric fit")
        return {"visit": jnp.asarray(vi), "detector": jnp.asarray(di), "ccd_visit": jnp.asarray(ki),
                "band_detector": jnp.asarray(gi)}

    def evaluate(self, visit, detector, x, y, xp=None) -> tuple[Any, Any]:
        """(calibration nJy/count, zero point AB mag of one count); arguments broadcast together.

        xp: None evaluates with JAX; an array namespace (numpy) evaluates without JAX."""
        visit, detector, x, y = np.broadcast_arrays(visit, detector, np.asarray(x, float), np.asarray(y, float))
        index = self.index(visit, detector)
        if xp is not None and xp is not jnp:
            value = jm.evaluate(self.model, {k: np.asarray(v) for k, v in index.items()}, x.ravel(), y.ravel(), xp=xp)
            kind = self.model.kind
            return (xp.reshape(jm.to_calibration(value, kind), x.shape),
                    xp.reshape(jm.to_zero_point(value, kind), x.shape))
        c, z = _evaluate(self.model, index, jnp.asarray(x.ravel()), jnp.asarray(y.ravel()))
        return np.asarray(c).reshape(x.shape), np.asarray(z).reshape(x.shape)

    def calibration(self, visit, detector, x, y, xp=None) -> np.ndarray:
        """nJy per count at 0-based pixels of detector-visits (by id): calibrated flux = instFlux x this."""
        return self.evaluate(visit, detector, x, y, xp)[0]

    def zero_point(self, visit, detector, x, y, xp=None) -> np.ndarray:
        """AB magnitude of one count: 31.4 - 2.5 log10(calibration)."""
        return self.evaluate(visit, detector, x, y, xp)[1]

    def save(self, path: str | Path) -> None:
        """Write `<path>.json` (model tree and ids) and `<path>.eqx` (array leaves, no pickle)."""
        meta = {"kind": "photometry", "visits": self.visits.tolist(),
                "detectors": self.detectors.tolist(), "ccd_visits": self.ccd_visits.tolist(),
                "bands": list(self.bands), "visit_band": self.visit_band.tolist(),
                "band_detectors": self.band_detectors.tolist()}
        if self.colour_slope_errors is not None:
            meta["colour_slope_errors"] = np.asarray(self.colour_slope_errors, float).tolist()
            meta["colour_terms"] = self.colour_terms()  # for reading; the values reload from the .eqx
        jm.save_form(path, self.model, meta)

    @classmethod
    def load(cls, path: str | Path, like: PhotometricTransform | None = None) -> "PhotometricSolution":
        """Reload `save`'s files, checked whole first (`jcal.solution.read_solution`)."""
        model, meta, ids = read_solution(path, like, PHOTOMETRY_IDS, ("ccd_visits", "band_detectors"), _check_bands)
        errors = meta.get("colour_slope_errors")
        return cls(model, ids["visits"], ids["detectors"], ids["ccd_visits"], tuple(meta["bands"]),
                   np.array(meta["visit_band"], np.int64), ids["band_detectors"],
                   None if errors is None else np.array(errors, float))


def save_photometric_model(solution, path: str | Path) -> None:
    """Save a fitted photometric model (a `PhotometricSolution`, or a `PhotometryFit`'s or
    `FitResult`'s) as `<path>.json` + `<path>.eqx`; `load_photometric_model(path)` reloads it."""
    solution = getattr(solution, "photometry", solution)
    solution = getattr(solution, "solution", solution)
    if not isinstance(solution, PhotometricSolution):
        raise TypeError(f"save_photometric_model takes a PhotometricSolution, PhotometryFit or FitResult with "
                        f"photometry, not {type(solution).__name__}")
    solution.save(path)


def load_photometric_model(path: str | Path, like: PhotometricTransform | None = None) -> PhotometricSolution:
    """Reload `OUT/photometry_model` written by `PhotometryFit.write` (or `PhotometricSolution.save`)."""
    return PhotometricSolution.load(path, like)


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
# Setting up
# --------------------------------------------------------------------------------------------


def _bands(data: InputData, assoc: Association):
    """Band names, and the band index of each association visit."""
    order = np.argsort(data.visits.visit)
    pos = order[np.searchsorted(data.visits.visit, assoc.visits, sorter=order)]
    names = data.visits.band[pos]
    bands, visit_band = np.unique(names, return_inverse=True)
    return tuple(str(b) for b in bands), visit_band.reshape(-1).astype(np.int64)


def _reference_band(config: FitConfig, band: str, data: InputData) -> str:
    ref_band = config.reference_band if config.reference_band is not None else band
    if ref_band not in data.refcat.fluxes:
        raise InputError(
            f"photometry: the reference catalog has no fluxes for band {ref_band!r} (visit band {band!r}; "
            f"config.reference_band = {config.reference_band!r}); it has {sorted(data.refcat.fluxes)}. "
            "Set config.reference_band to one of those, or turn photometry off")
    return ref_band


def _reference_fluxes(data: InputData, assoc: Association, ref_bands, kind: str):
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


def _colour_term_model(config: FitConfig, bands: tuple[str, ...], data: InputData) -> ColourTerms | None:
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


def _reference_colours(data: InputData, assoc: Association, terms: ColourTerms):
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


def _colour_term_errors(data: InputData, assoc: Association, terms: ColourTerms, colour: np.ndarray,
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


def _check_colour_spread(terms: ColourTerms, colour: np.ndarray, has_ref: np.ndarray, bands) -> None:
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


def _focal_domain(data: InputData, assoc: Association, focal: jm.Grouped):
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


def _detector_fields(data: InputData, assoc: Association, bd_detector: np.ndarray, order: int):
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


def _initial_calibration(assoc, m_band, visit_band, ratio_ok, ratio, n_bands):
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


def _informative(star: np.ndarray, band: np.ndarray, use: np.ndarray, has_ref: np.ndarray) -> np.ndarray:
    """(m,) bool: used measurements whose star has another used measurement in the band, or a
    reference flux there. The others only fix their own star's flux: no calibration information."""
    n_stars, n_bands = has_ref.shape
    n = np.zeros((n_stars, n_bands), np.int64)
    np.add.at(n, (star[use], band[use]), 1)
    return use & ((n[star, band] >= 2) | has_ref[star, band])


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
