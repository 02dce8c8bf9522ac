"""The photometric fit: association in, fitted calibration model and star fluxes out.

It runs the recipe of `jcal.calibration.astrometry` (`jcal.calibration.recipe`) on the problem of
`photometry_problem`: constrained models fit their visit fields first, then the whole model,
then the star fluxes, gross outliers out, everything together, outlier rounds; with jointcal's
flux errors, refreshed fits until chi2 stops changing. Model forms are in `jcal_models.photometry`,
the fitted model (`PhotometricSolution`, save and reload) in `jcal.photometry_solution`, the
result in `photometry_result`. The residuals, the flux-error conventions, colour terms and the
gauge are explained in `docs/photometry.md`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from jcal_models.photometry import PhotometricTransform, WithColourTerms, base_form

from ..associate import Association
from ..config import FitConfig
from ..data import InputData
from ..jax_setup import ensure_configured
from ..photometry_solution import PhotometricSolution, evaluate_calibration
from ..photometry_solution import load_photometric_model, save_photometric_model
from ..solver import FitState, SingularSystemError, Solver
from ..solver.compile import CompileClock
from .photometry_problem import (PhotometryProblem, flux_residual, instrument_value, magnitude_residual,
                                 photometry_problem, reference_photometry_residual)
from .photometry_result import GRID, PhotometryFit
from .recipe import Calibration, Fit, IterateErrors, RejectGross, RejectUntilClean, run_recipe

log = logging.getLogger("jcal.calibration.photometry")

__all__ = ["PhotometricCalibration", "PhotometricSolution", "PhotometryFit", "detector_fields_significant",
           "fit_photometry", "flux_residual", "instrument_value", "load_photometric_model", "magnitude_residual",
           "photometry_recipe", "reference_photometry_residual", "save_photometric_model"]

MAX_ERROR_REFRESHES = 30  # flux models: refresh-and-solve rounds towards the fixed point


def photometry_recipe(config: FitConfig, kind: str) -> tuple:
    """The photometric fit as declared steps (`jcal.calibration.recipe`)."""
    steps = (
        Fit("visits", mapping="first_stage"),  # constrained models: visit fields only, detectors held
        Fit("model", mapping="stars_held"),  # colour terms move only with the stars
        Fit("stars", stars=True),
        RejectGross(refit=Fit("stars", stars=True)),
        Fit("all", mapping="free", stars=True),
        RejectUntilClean(refit=Fit("all", mapping="free", stars=True), refit_stars=Fit("stars", stars=True)),
    )
    if kind == "flux" and config.flux_errors == "jointcal":  # errors held per solve, refreshed until nothing moves
        steps += (IterateErrors(Fit("all", mapping="free", stars=True), max_rounds=MAX_ERROR_REFRESHES),)
    return steps


@dataclass
class PhotometricCalibration(Calibration):
    """The photometric side of the recipe: a star's band is fitted while it has data there; flux
    models refresh the calibration their errors scale with."""

    setup: PhotometryProblem | None = None
    association: Association | None = None

    def star_mask(self, state: FitState) -> np.ndarray:
        """(S, B): a star's band is fitted while it has an unrejected measurement or a used reference flux."""
        assoc, p = self.association, self.setup
        active = np.zeros((assoc.n_stars, len(p.bands)))
        np.add.at(active, (assoc.star, p.measurement_band), state.weights[: assoc.n_measurements])
        return ((active > 0) | (p.has_reference & (state.star_weights[: assoc.n_stars, None] > 0))).astype(float)

    def refresh_errors(self, state: FitState, live: bool | None = None) -> None:
        """Flux models: freeze the error's calibration at the current model (and switch modes)."""
        if state.mapping.kind != "flux":
            return
        solver, n = self.solver, self.association.n_measurements
        index = {k: jnp.asarray(v[:n]) for k, v in solver.problem.index.items() if k != "star"}
        data = solver.problem.data
        c, _ = evaluate_calibration(state.mapping, index, jnp.asarray(data["x"][:n]), jnp.asarray(data["y"][:n]))
        solver.set_data("c_fixed", np.abs(np.asarray(c)))
        if live is not None:
            solver.set_data("live", np.full(n, 1.0 if live else 0.0))

    def explain(self, error: SingularSystemError) -> SingularSystemError:
        config = self.config
        return SingularSystemError(
            f"photometry ({config.photometry_model}): {error}. With a constrained model, lower "
            f"config.photometry_visit_order (now {config.photometry_visit_order}) or use a simple_* model",
            error.parameters)


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
    t_start, clock = time.perf_counter(), CompileClock()
    setup = photometry_problem(data, assoc, config, astrometry, model, mapping_filter)
    solver = Solver(setup.problem)
    model = setup.model
    log.info("photometry (%s): %d measurements, %d stars (%d with reference), %d band(s), %d mapping + %d star "
             "parameters", type(model).__name__, int(setup.valid.sum()), assoc.n_stars,
             int(setup.has_reference.any(1).sum()), len(setup.bands), solver.sizes["mapping_parameters"],
             solver.sizes["star_parameters"])
    calibration = PhotometricCalibration("photometry", solver, config, _masks(solver, model), 2, progress=progress,
                                         setup=setup, association=assoc)
    state = solver.new_state(model, setup.problem.stars, setup.valid.astype(float),
                             setup.has_reference.any(axis=1).astype(float))
    state = run_recipe(photometry_recipe(config, model.kind), calibration, state)

    star_mask = calibration.star_mask(state)
    chi2 = calibration.total_chi2(state)
    mapping_mask = calibration.mapping_masks["free"]
    ndof = solver.ndof(state, mapping_mask, star_mask)
    calibration.stage_seconds["total"] = time.perf_counter() - t_start
    calibration.stage_seconds["compile"] = clock.seconds()  # part of the stages' time
    log.info("photometry: chi2 %.6g, ndof %d (chi2/ndof %.4g), %d outliers", chi2, ndof, chi2 / max(ndof, 1),
             state.n_outliers)
    solution = PhotometricSolution(state.mapping, assoc.visits, assoc.detectors, assoc.ccd_visits, setup.bands,
                                   setup.visit_band, setup.band_detector)
    fit = PhotometryFit(state.mapping, solver.real_stars(state.stars), solution, data, assoc, solver.prepared, state,
                        mapping_mask, star_mask, dict(setup.problem.index), setup.bands, setup.reference_bands,
                        setup.measurement_band, setup.valid, setup.has_reference, chi2, ndof, setup.counts,
                        calibration.stage_seconds, reference_colour=setup.reference_colour,
                        colour_applied=setup.colour_applied)
    if isinstance(state.mapping, WithColourTerms):
        fit.solution = dataclasses.replace(solution, colour_slope_errors=fit.colour_slope_errors())
        for band, t in fit.solution.colour_terms().items():
            log.info("photometry: colour term of band %s: c1 = %.5f +- %.5f (%s), c0 = %g, c2 = %g, colour %s - %s",
                     band, t["c1"], t["c1_err"], "fitted" if t["fitted"] else "fixed", t["c0"], t["c2"],
                     t["primary"], t["secondary"])
    _check_field(fit)
    return fit


def _masks(solver: Solver, model) -> dict[str, np.ndarray]:
    """The recipe's mapping masks: the gauge's free parameters, the form's first stage (if any), and
    the model stage's (`stars_held`: e.g. colour terms held)."""
    pm_params, _ = eqx.partition(model, solver.mapping_filter)
    ones = jax.tree.map(jnp.ones_like, pm_params)
    masks = {"free": solver.mapping_mask(model.fix_gauge(ones))}
    first_stage = model.first_stage(ones)
    if first_stage is not None:
        masks["first_stage"] = masks["free"] * solver.mapping_mask(first_stage)
    masks["stars_held"] = masks["free"] * solver.mapping_mask(model.stars_held(ones))
    return masks


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
    params, _ = eqx.partition(model, fit.mapping_filter)
    chosen = jax.tree.map(jnp.zeros_like, params)
    chosen = eqx.tree_at(where, chosen, jnp.ones_like(where(chosen)))
    sel = (fit.problem.mapping_mask(chosen) * np.asarray(fit.mapping_mask)) > 0
    if not sel.any():
        return True
    g = np.asarray(fit.layout.flatten(params))[sel]
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
