"""What a fit returns (`FitResult`) and how it is written to disk (atomically).

Output directory layout:
    wcs/<visit>_<detector>.fits   TAN-SIP (or TPV) approximation of the fitted map (JCAL_RMS/JCAL_MAX)
    wcs_tpv/                      the TPV files too, for config.wcs_format = "both"
    model.json + model.eqx        the exact fitted astrometric model (`jcal.load_model`)
    measurements.parquet          per measurement: ids, pixels, star, fitted sky position, residuals,
                                  chi2 and leave-one-out chi2 (chi2_deleted, what the report normalises by)
    stars.parquet                 fitted stars: position, errors, proper motion, counts, reference id
    metrics.json                  jointcal's metric names + the fit's own (iterations, outliers, times)
    config.json                   the FitConfig used
    photometry files              see jcal.calibration.photometry (when photometry ran)
"""

from __future__ import annotations

import json
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
from astropy.io import fits

import jcal_models as jm

from .associate import Association, ccd_visits_not_fitted
from .config import FitConfig
from .data import InputData
from .calibration.astrometry_result import AstrometryFit
from .io.atomic import atomic_output_dir
from .io.sip import fit_wcs_many, wcs_fits_bytes
from .progress import capture_warnings
from .solution import AstrometricSolution
from .solver.compile import brief_jit

log = logging.getLogger("jcal")
MAS_PER_DEG = 3.6e6


@dataclass
class FitResult:
    data: InputData
    config: FitConfig
    association: Association
    astrometry: AstrometryFit | None = None
    photometry: Any = None  # jcal.calibration.photometry.PhotometryFit
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # what the fit logged as warnings (metrics "warnings")
    input_screening: dict[str, Any] = field(default_factory=dict)  # jcal.screen.screen_input's summary

    # -- astrometry ------------------------------------------------------------------------------
    @property
    def solution(self) -> AstrometricSolution:
        a = self.association
        return AstrometricSolution(self.astrometry.model, a.visits, a.detectors, a.ccd_visits)

    def pixel_to_sky(self, visit, detector, x, y) -> tuple[np.ndarray, np.ndarray]:
        """Fitted (ra, dec) [deg] at 0-based pixels of detector-visits (by id)."""
        return self.solution.pixel_to_sky(visit, detector, x, y)

    def sky_covariance(self, visit, detector, x, y) -> np.ndarray:
        """(n, 2, 2) covariance [mas^2] of the fitted sky position (ra cos dec, dec) at 0-based
        pixels, from the mapping-parameter covariance (marginalised over the stars)."""
        fit = self.astrometry
        visit, detector, x, y = np.broadcast_arrays(visit, detector, np.asarray(x, float), np.asarray(y, float))
        index = self.solution.index(visit.ravel(), detector.ravel())
        xs, ys = jnp.asarray(x.ravel()), jnp.asarray(y.ravel())
        pm, _ = eqx.partition(fit.model, fit.mapping_filter)

        def sky_mas(theta):
            ra, dec = jm.evaluate(fit.model_from(theta), index, xs, ys)
            return jnp.stack([ra * jnp.cos(jnp.radians(dec)), dec], axis=1) * MAS_PER_DEG

        jac = np.asarray(jax.jacrev(sky_mas)(fit.layout.flatten(pm)))  # (n, 2, N)
        return np.einsum("aip,pq,ajq->aij", jac, fit.mapping_covariance(), jac)

    def _sip_order(self) -> int | None:
        """SIP order that represents the fitted model form exactly (None: choose per detector)."""
        return self.astrometry.model.sip_order()

    def wcs_cards(self, ccd_visits=None, kind: str = "sip") -> dict[tuple[int, int], tuple[list, float]]:
        """{(visit, detector): (FITS cards, approximation RMS in mas)}: TAN-SIP (or kind="tpv": TPV)
        of the fitted map over each detector, fitted for all detector-visits of one size at once."""
        keys = self.association.ccd_visits.tolist() if ccd_visits is None else ccd_visits
        out: dict = {}
        for part in self.iter_wcs_cards(keys, (kind,), chunk=len(keys) or 1):
            out.update(part[kind])
        return out

    def iter_wcs_cards(self, keys, kinds=("sip",), chunk: int = 256):
        """Yield {kind: {(visit, detector): (cards, rms mas)}} for `keys`, at most `chunk` detector-
        visits at a time (one batched fit per detector size and chunk: bounded memory, and a
        caller can show progress)."""
        sol = self.solution
        sizes: dict[tuple[int, int], list] = {}
        for visit, detector in keys:
            cv = self.data.ccd_visits[(int(visit), int(detector))]
            sizes.setdefault((cv.nx, cv.ny), []).append((int(visit), int(detector)))
        for (nx, ny), group in sizes.items():
            for start in range(0, len(group), chunk):
                part = group[start:start + chunk]
                visits, detectors = (np.array(a, np.int64) for a in zip(*part))
                fitted = fit_wcs_many(
                    lambda item, x, y: sol.pixel_to_sky(visits[item], detectors[item], x, y), len(part), nx, ny,
                    crval=sol.tangent_points(visits), order=self._sip_order(), grid=16, kinds=tuple(kinds))
                yield {kind: {key: (c, float(r)) for key, c, r in zip(part, *fitted[kind])} for kind in kinds}

    def wcs_header(self, visit: int, detector: int, kind: str = "sip"):
        """(FITS header, approximation RMS in mas): TAN-SIP (or TPV) of the fitted map over the detector."""
        cards, rms = self.wcs_cards([(visit, detector)], kind)[(int(visit), int(detector))]
        return fits.Header(cards), rms

    def measurement_table(self) -> dict[str, np.ndarray]:
        a, fit = self.association, self.astrometry
        src = self.data.sources
        rows = a.source_index
        cols: dict[str, np.ndarray] = {
            "source_id": src.source_id[rows], "visit": a.visits[a.visit_index],
            "detector": a.detectors[a.detector_index], "x": src.x[rows], "y": src.y[rows], "star": a.star,
            "inst_flux": src.inst_flux[rows], "inst_flux_err": src.inst_flux_err[rows],
        }
        if fit is not None:
            ra, dec = self.solution.pixel_to_sky(cols["visit"], cols["detector"], cols["x"], cols["y"])
            epoch = fit.epoch
            sra, sdec = (np.asarray(v) for v in _star_positions(fit.stars, a.star, epoch))
            xi, eta = (np.asarray(v) for v in _sky_to_tangent(ra, dec, sra, sdec))
            held = fit.held_out if fit.held_out is not None else np.zeros(len(a.star), bool)
            chi2 = np.where(held, fit.held_out_chi2 if fit.held_out_chi2 is not None else 0.0,
                            fit.chi2_per_measurement())
            cols.update(ra=ra, dec=dec, residual_ra_mas=xi * MAS_PER_DEG, residual_dec_mas=eta * MAS_PER_DEG,
                        chi2=chi2, chi2_deleted=np.where(held, chi2, fit.deleted_chi2_per_measurement()),
                        outlier=fit.rejected, held_out=held)
        if self.photometry is not None:
            cols.update(self.photometry.measurement_columns())
        return cols

    def star_table(self) -> dict[str, np.ndarray]:
        a, fit = self.association, self.astrometry
        cols: dict[str, np.ndarray] = {
            "star": np.arange(len(a.star_ra)), "n_measurements": np.bincount(a.star, minlength=len(a.star_ra)),
            "ref_index": a.star_ref,
            "ref_id": np.where(a.star_ref >= 0, self.data.refcat.ref_id[np.maximum(a.star_ref, 0)], -1),
        }
        if fit is not None:
            stars = fit.stars
            ra, dec = (np.asarray(v) for v in _star_positions(stars, np.arange(stars.n_stars), stars.epoch0))
            cols.update(ra=ra, dec=dec, epoch=np.asarray(stars.epoch0))
            if stars.pm is not None:
                cols.update(pm_ra=np.asarray(stars.pm[:, 0]) * MAS_PER_DEG, pm_dec=np.asarray(stars.pm[:, 1]) * MAS_PER_DEG)
            err = fit.star_errors()
            cols.update({f"{k}_err": v for k, v in err.items()})
        if self.photometry is not None:
            cols.update(self.photometry.star_columns())
        return cols

    @property
    def metrics(self) -> dict[str, Any]:
        a = self.association
        out: dict[str, Any] = {"association": dict(a.counts)}
        fit = self.astrometry
        if fit is not None:
            has_ref = a.star_ref >= 0
            out.update({
                "astrometry_collected_refStars": int(a.counts.get("reference_stars_collected", 0)),
                "astrometry_prepared_refStars": int(has_ref.sum()),
                "astrometry_matched_fittedStars": int(has_ref.sum()),
                "astrometry_prepared_fittedStars": int(len(a.star_ra)),
                "astrometry_prepared_ccdImages": int(len(a.ccd_visits)),
                "astrometry_final_chi2": fit.chi2,
                "astrometry_final_ndof": fit.ndof,
                "astrometry_chi2_per_ndof": fit.chi2 / max(fit.ndof, 1),
                "astrometry_iterations": len(fit.state.history),
                "astrometry_outliers": fit.state.n_outliers,
                "astrometry_reference_outliers": fit.state.n_reference_outliers,
                "astrometry_converged": fit.state.converged,
                "astrometry_stage_seconds": fit.stage_seconds,
                "astrometry_sizes": fit.sizes,
                "astrometry_chi2_history": [h["chi2"] for h in fit.state.history],
            })
            out["ccd_visit_constraints"] = ccd_visit_constraints(a)
            if fit.held_out is not None:
                out["holdout"] = self.holdout_metrics()
        out["ccd_visits_not_fitted"] = ccd_visits_not_fitted(self.data, a, self.config)
        if self.photometry is not None:
            out.update(self.photometry.metrics())
        out["input_screening"] = dict(self.input_screening)
        out["timings"] = dict(self.timings)
        out["warnings"] = list(self.warnings)
        return out

    def ccd_visit_table(self) -> dict[str, np.ndarray]:
        """One row per detector-visit of the input, fitted or not: `fitted`, the `reason` when not
        (named as in metrics.json, input screening included), and how its mapping is constrained
        (measurements, those of stars seen in another visit, those matched to a reference star)."""
        a = self.association
        rows = {(c["visit"], c["detector"]): dict(c, fitted=True, reason="") for c in ccd_visit_constraints(a)}
        for m in ccd_visits_not_fitted(self.data, a, self.config):
            rows[(m["visit"], m["detector"])] = dict(m, fitted=False)
        for v, d in self.input_screening.get("excluded_ccd_visits", []):
            rows[(int(v), int(d))] = {"visit": int(v), "detector": int(d), "fitted": False,
                                      "reason": "excluded before association: first-guess WCS far from every "
                                                "reference star and every other visit (far_off_wcs)"}
        table = [rows[k] for k in sorted(rows)]
        return {"visit": np.array([r["visit"] for r in table], np.int64),
                "detector": np.array([r["detector"] for r in table], np.int64),
                "fitted": np.array([r["fitted"] for r in table], bool),
                "reason": np.array([r["reason"] for r in table], dtype=object),
                **{k: np.array([r.get(k, 0) for r in table], np.int64)
                   for k in ("measurements", "shared_with_other_visits", "with_reference")}}

    def holdout_metrics(self) -> dict[str, Any]:
        """Residuals of the stars held out of the astrometric fit (refitted alone on its mapping): a check
        of over-fitting without a truth. RMS per axis in mas over measurements within 5 sigma (the others
        count as outliers), overall, per visit and per detector-visit."""
        a, fit = self.association, self.astrometry
        rows = np.flatnonzero(fit.held_out)
        visit, detector = a.visits[a.visit_index[rows]], a.detectors[a.detector_index[rows]]
        src = self.data.sources
        ra, dec = self.solution.pixel_to_sky(visit, detector, src.x[a.source_index[rows]], src.y[a.source_index[rows]])
        epoch = fit.epoch[rows]
        sra, sdec = (np.asarray(v) for v in _star_positions(fit.stars, a.star[rows], epoch))
        xi, eta = (np.asarray(v) * MAS_PER_DEG for v in _sky_to_tangent(ra, dec, sra, sdec))
        chi2 = fit.held_out_chi2[rows]
        good = chi2 < 25.0
        sq = (xi**2 + eta**2) / 2

        def summary(sel):
            g = sel & good
            return {"measurements": int(sel.sum()), "outliers": int((sel & ~good).sum()),
                    "rms_mas": float(np.sqrt(sq[g].mean())) if g.any() else None,
                    "chi2_per_point": float(chi2[g].mean() / 2) if g.any() else None}

        return {"fraction": self.config.holdout_fraction, "stars": int(np.unique(a.star[rows]).size),
                **{f"astrometry_{k}": v for k, v in summary(np.ones(rows.size, bool)).items()},
                "per_visit": {int(v): summary(visit == v) for v in np.unique(visit)},
                "per_ccd_visit": [{"visit": int(v), "detector": int(d), **summary((visit == v) & (detector == d))}
                                  for v, d in np.unique(np.stack([visit, detector], 1), axis=0).tolist()]}

    # -- output ----------------------------------------------------------------------------------
    def write(self, out_dir: str | Path, *, overwrite: bool = False, progress=None, protect=()) -> Path:
        """Write every output into `out_dir` atomically (all or nothing, see `atomic_output_dir`).

        overwrite: replace a previous jcal output at `out_dir` (never a folder jcal did not
            write, nor the folder the data was read from, nor one holding a `protect` path).
        progress: optional callable(n), called as each batch of n detector-visits' WCS files is written.
        """
        protect = (*protect, self.data.origin)
        with atomic_output_dir(out_dir, overwrite=overwrite, protect=protect) as tmp:
            self.write_files(tmp, progress=progress)
        return Path(out_dir)

    def write_files(self, folder: Path, *, progress=None) -> None:
        """Write every output file into the existing (temporary) `folder`; `write` makes it atomic."""
        t0 = time.perf_counter()
        tmp = Path(folder)
        with capture_warnings(self.warnings):
            if self.astrometry is not None:
                self._write_wcs(tmp, progress)
                self.solution.save(tmp / "model")
            _write_parquet(tmp / "measurements.parquet", self.measurement_table())
            _write_parquet(tmp / "stars.parquet", self.star_table())
            _write_parquet(tmp / "ccd_visits.parquet", self.ccd_visit_table())
            if self.photometry is not None:
                self.photometry.write(tmp)
            self.config.save(tmp / "config.json")
            self.timings["write"] = time.perf_counter() - t0
            (tmp / "metrics.json").write_text(json.dumps(_jsonable(self.metrics), indent=2) + "\n")

    def _write_wcs(self, tmp: Path, progress=None) -> None:
        """wcs/<visit>_<detector>.fits (TAN-SIP, or TPV for wcs_format="tpv"), and wcs_tpv/ for "both"."""
        fmt = self.config.wcs_format
        kinds = {"sip": ("sip",), "tpv": ("tpv",), "both": ("sip", "tpv")}[fmt]
        folders = {kinds[0]: tmp / "wcs", "tpv": tmp / "wcs_tpv"} if fmt == "both" else {kinds[0]: tmp / "wcs"}
        for folder in folders.values():
            folder.mkdir()
        worst = 0.0
        for part in self.iter_wcs_cards(self.association.ccd_visits.tolist(), kinds):
            for kind, items in part.items():
                for (visit, detector), (cards, rms) in items.items():
                    worst = max(worst, rms)
                    # plain writes: the staging folder makes the whole output atomic
                    (folders[kind] / f"{visit}_{detector}.fits").write_bytes(wcs_fits_bytes(cards))
            if progress:
                progress(len(next(iter(part.values()))))
        self.timings["wcs_approximation_worst_rms_mas"] = worst


def ccd_visit_constraints(a: Association) -> list[dict[str, Any]]:
    """Per fitted detector-visit: how its mapping is constrained (measurements, those of stars seen in
    another visit, those matched to a reference star)."""
    k = a.ccd_visit_index
    n_k = len(a.ccd_visits)
    seen = np.bincount(a.star, minlength=a.n_stars)
    has_ref = a.star_ref >= 0
    n = np.bincount(k, minlength=n_k)
    shared = np.bincount(k, weights=seen[a.star] >= 2, minlength=n_k)
    ref = np.bincount(k, weights=has_ref[a.star], minlength=n_k)
    return [{"visit": int(v), "detector": int(d), "measurements": int(n[i]), "shared_with_other_visits": int(shared[i]),
             "with_reference": int(ref[i])} for i, (v, d) in enumerate(a.ccd_visits.tolist())]


@brief_jit  # one program, not one per primitive (eager dispatch compiles each op for each new shape)
def _star_positions(stars: jm.Stars, rows, epoch):
    view = jm.Stars(stars.offset[rows], None if stars.pm is None else stars.pm[rows], stars.ra0[rows],
                    stars.dec0[rows], stars.epoch0[rows])
    return jax.vmap(lambda s, t: s.position(t))(view, jnp.asarray(epoch))


_sky_to_tangent = brief_jit(jm.sky_to_tangent)


def _write_parquet(path: Path, columns: dict[str, np.ndarray]) -> None:
    pq.write_table(pa.table({k: np.asarray(v) for k, v in columns.items()}), path)


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.generic,)):
        return x.item()
    if isinstance(x, float) and not np.isfinite(x):
        return str(x)
    return x
