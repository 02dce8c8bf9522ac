"""What the photometric fit returns (`PhotometryFit`): the fitted model and star fluxes, and the
tables, metrics and files written from them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from jcal_models.photometry import (AB_ZERO_POINT_NJY, ConstrainedFlux, ConstrainedMagnitude, PhotometricStars,
                                    PhotometricTransform, WithColourTerms, base_form)

from ..associate import Association
from ..data import InputData
from ..photometry_solution import PhotometricSolution, evaluate_calibration, local_means
from ..solver import FitState, PreparedProblem
from .fit_result import SolvedProblem
from .photometry_setup import MAG_PER_FRACTION, informative_measurements

GRID = 8  # samples per axis of a detector for photo_calib_grid.parquet
MEAN_GRID = 16  # samples per axis for the mean calibration over a detector
BRIGHT_SNR = 100.0  # repeatability uses measurements above this S/N


@dataclass
class PhotometryFit(SolvedProblem):
    """The fitted calibration model and star fluxes, with the state and problem they were fitted from,
    and the tables and metrics written from them."""

    model: PhotometricTransform  # fitted pixel -> calibration model (full, with group axes)
    stars: PhotometricStars
    solution: PhotometricSolution
    data: InputData
    association: Association
    problem: PreparedProblem
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
            c, _ = evaluate_calibration(self.model, idx, jnp.asarray(self.data.sources.x[rows]),
                             jnp.asarray(self.data.sources.y[rows]))
            self._cache["meas_calib"] = np.asarray(c)
        return self._cache["meas_calib"]

    def informative(self) -> np.ndarray:
        """(m,) bool: unrejected measurements that constrain the calibration (their star has another
        unrejected measurement in the band, or a reference flux there)."""
        used = self.weights > 0
        ref = self.has_reference & (self.star_weights[:, None] > 0)
        return informative_measurements(self.association.star, self.measurement_band, used, ref)

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
        pm, _ = eqx.partition(self.state.mapping, self.mapping_filter)
        if pm.colour.slope is None:  # fixed coefficients: not parameters of the fit
            return np.zeros(n_bands)
        marker = eqx.tree_at(lambda m: m.colour.slope, jax.tree.map(jnp.zeros_like, pm),
                             jnp.arange(1.0, n_bands + 1.0))
        where = np.asarray(self.layout.flatten(marker))
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
        (pm, sm), _ = self.problem.split(self.state.mapping, self.state.stars)
        mean, jac = local_means(pm, sm, index, gx, gy)
        mean, jac = np.asarray(mean), np.asarray(jac)
        layout = self.layout
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
        cov = self.star_covariance()
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
            "photometry_sizes": self.sizes,
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
