"""The astrometric fit: association in, fitted pixel->sky model and stars out.

`astrometry_recipe` declares the stages (`jcal.calibration.recipe`), `AstrometricCalibration`
supplies what they need from astrometry (the error model refreshed through the current model,
anchored stages, re-association through the fitted map), `fit_astrometry` runs them. The
residuals and the problem's set-up are in `astrometry_problem`, the result in `astrometry_result`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import jcal_models as jm
from jcal_models import MAS

from ..associate import Association, associate
from ..config import FitConfig
from ..data import InputData
from ..jax_setup import ensure_configured
from ..solver import FitState, Solver
from ..solver.compile import CompileClock
from .astrometry_problem import (AstrometryProblem, astrometric_residual, astrometry_problem, reference_residual,
                                 whitening)
from .astrometry_result import AstrometryFit
from .astrometry_setup import fitted_projector, holdout_stars, missed_reference_matches, references_constrain_every_group
from .recipe import (Calibration, Fit, FitHeldOut, HeldOut, Reassociate, RejectGross, RejectUntilClean, Rematch,
                     run_recipe)

__all__ = ["AstrometricCalibration", "AstrometryFit", "AstrometryProblem", "astrometric_residual",
           "astrometry_recipe", "fit_astrometry", "reference_residual"]

log = logging.getLogger("jcal.calibration.astrometry")


def astrometry_recipe(*, rematch: bool) -> tuple:
    """The astrometric fit as declared steps (`jcal.calibration.recipe`): the mapping anchored on
    reference stars (visit terms first when the form asks, `first_stage`), then the stars, gross
    outliers out, everything together, outlier rounds to a clean fit, the held-out stars; and,
    when the fitted stars match more reference stars, all again from a new association."""
    return (
        Fit("visits", mapping="first_stage", anchored=True, warm_up=True),
        Fit("mappings", mapping="free", anchored=True, warm_up=True),
        Fit("stars", stars=True, warm_up=True),
        RejectGross(refit=Fit("stars", stars=True)),
        Fit("all", mapping="free", stars=True),
        RejectUntilClean(refit=Fit("all", mapping="free", stars=True), refit_stars=Fit("stars", stars=True)),
        FitHeldOut(),
    ) + ((Rematch(gain=REMATCH_GAIN),) if rematch else ())


REMATCH_GAIN = 0.01  # re-associate when the fitted stars would match this fraction more reference stars


@dataclass
class AstrometricCalibration(Calibration):
    """The astrometric side of the recipe: centroid errors carried through the current model,
    anchored stages on reference-matched measurements, re-association through the fitted map."""

    data: InputData | None = None
    association: Association | None = None
    reference_weights: np.ndarray | None = None  # (n,) padded: 1 for measurements of reference-matched stars
    fixed_star_mask: np.ndarray | None = None  # (S, 2 or 4)
    centroid_errors: tuple | None = None  # (x_err, y_err) of each measurement
    _whitened_for: object = None  # the mapping the current whitening was computed with

    def star_mask(self, state: FitState) -> np.ndarray:
        return self.fixed_star_mask

    def refresh_errors(self, state: FitState, live: bool | None = None) -> None:
        if state.mapping is self._whitened_for:  # e.g. stars-only stages: the mapping has not moved
            return
        self._whitened_for = state.mapping
        solver = self.solver
        data = solver.problem.data
        index = {k: jnp.asarray(v[: solver.n_real]) for k, v in solver.problem.index.items() if k != "star"}
        n = solver.n_real
        w = whitening(state.mapping, index, jnp.asarray(data["x"][:n]), jnp.asarray(data["y"][:n]),
                       *(jnp.asarray(e) for e in self.centroid_errors), self.config.astrometry_pedestal_mas * MAS)
        solver.set_data("whiten", np.asarray(w))

    def anchor_weights(self, state: FitState) -> np.ndarray | None:
        anchored = state.weights * self.reference_weights
        solver = self.solver
        index = {k: v[: solver.n_real] for k, v in solver.problem.index.items()}
        return anchored if references_constrain_every_group(solver, index, anchored[: solver.n_real]) else None

    def rematch(self, state: FitState, gain: float) -> FitState | Reassociate:
        stars = self.solver.real_stars(state.stars)
        more = missed_reference_matches(self.data, self.association, stars, self.config)
        if more <= gain * max(int(np.sum(self.association.star_ref >= 0)), 1):
            return state
        log.info("astrometry: the fitted stars match %d more reference stars: associating again through the "
                 "fitted map and refitting", more)
        return Reassociate(associate(self.data, self.config,
                                     project=fitted_projector(self.data, self.association, state.mapping)))


def fit_astrometry(data: InputData, assoc: Association, config: FitConfig, *, model: jm.Transform | None = None,
                   mapping_filter=None, progress=None) -> AstrometryFit:
    """Staged Gauss-Newton fit with outlier rejection (`astrometry_recipe`: jointcal's recipe, vectorised).

    model: a starting model of any astrometric form (default: from the first-guess WCS, as
        `config.astrometry_model` says); a given model is not re-associated.
    mapping_filter: bool pytree like the model marking fitted leaves (`jcal_models.freeze`).
    progress: optional callable(stage: str, chi2: float), called after each stage.
    """
    ensure_configured()  # 64-bit floats, before any array is made
    t_start, clock = time.perf_counter(), CompileClock()
    calibration, state = _calibration(data, assoc, config, model, mapping_filter, progress)
    recipe = astrometry_recipe(rematch=model is None and config.rematch_rounds > 0)
    outcome = run_recipe(recipe, calibration, state)
    if isinstance(outcome, Reassociate):  # bounded: one round fewer each time
        again = fit_astrometry(data, outcome.association, config.replace(rematch_rounds=config.rematch_rounds - 1),
                               mapping_filter=mapping_filter, progress=progress)
        again.stage_seconds["before_rematch"] = time.perf_counter() - t_start - again.stage_seconds["total"]
        again.stage_seconds["total"] = time.perf_counter() - t_start
        again.stage_seconds["compile"] = clock.seconds()
        return again
    solver, state = calibration.solver, outcome
    c_m, c_s = solver.chi2(state)
    mapping_mask, star_mask = calibration.mapping_masks["free"], calibration.fixed_star_mask
    ndof = solver.ndof(state, mapping_mask, star_mask)
    calibration.stage_seconds["total"] = time.perf_counter() - t_start
    calibration.stage_seconds["compile"] = clock.seconds()  # part of the stages' time
    held = calibration.held_out
    return AstrometryFit(state.mapping, solver.real_stars(state.stars), assoc, solver.prepared, state, mapping_mask,
                         star_mask, dict(solver.problem.index), float(c_m.sum() + c_s.sum()), ndof,
                         calibration.stage_seconds, None if held is None else held.measurements,
                         None if held is None else state.held_out_chi2)


def _calibration(data: InputData, assoc: Association, config: FitConfig, model, mapping_filter,
                 progress) -> tuple[AstrometricCalibration, FitState]:
    """The problem's solver, the masks of the recipe's stages, the held-out stars and the starting state."""
    setup = astrometry_problem(data, assoc, config, model, mapping_filter)
    model, has_ref, proper_motion = setup.model, setup.has_reference, setup.proper_motion
    solver = Solver(setup.problem)
    log.info("astrometry: %d measurements, %d stars (%d with reference), %d mapping + %d star parameters",
             solver.n_measurements, solver.n_stars, has_ref.sum(), solver.sizes["mapping_parameters"],
             solver.sizes["star_parameters"])

    # masks: the gauge (the form's `fix_gauge`) and the form's first stage (`first_stage`), if any
    pm_params, _ = eqx.partition(model, solver.mapping_filter)
    ones = jax.tree.map(jnp.ones_like, pm_params)
    masks = {"free": solver.mapping_mask(model.fix_gauge(ones))}
    first_stage = model.first_stage(ones)
    if first_stage is not None:  # e.g. visit terms only, detectors held
        masks["first_stage"] = masks["free"] * solver.mapping_mask(first_stage)
    held_star = holdout_stars(assoc, has_ref, config.holdout_fraction)
    held = held_star[assoc.star]
    src, rows = data.sources, assoc.source_index
    calibration = AstrometricCalibration(
        "astrometry", solver, config, masks, config.min_measurements,
        held_out=HeldOut(held, held_star * float(proper_motion)), progress=progress, data=data, association=assoc,
        reference_weights=solver.pad_measurements(has_ref[assoc.star]),
        fixed_star_mask=np.ones((solver.stars_real, 4 if proper_motion else 2)),
        centroid_errors=(src.x_err[rows], src.y_err[rows]))
    state = solver.new_state(model, setup.problem.stars, (~held).astype(float),
                             np.maximum(has_ref, proper_motion) * ~held_star)  # held out: never in the fit
    return calibration, state
