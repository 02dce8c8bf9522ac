"""The fit recipe shared by astrometry and photometry: steps declared as data, run in order.

A recipe is a tuple of steps; each step takes the calibration it works for and an immutable
`FitState`, and returns a new state. The astrometric recipe, as `jcal.calibration.astrometry`
declares it (jointcal's `minimize("Distortions")`, `minimize("Positions")`, then everything and
the outlier loop):

    Fit("visits", mapping="first_stage", anchored=True, warm_up=True),  # when the form has one
    Fit("mappings", mapping="free", anchored=True, warm_up=True),
    Fit("stars", stars=True, warm_up=True),
    RejectGross(),
    Fit("all", mapping="free", stars=True),
    RejectUntilClean(),
    FitHeldOut(),
    Rematch(),

A `Calibration` supplies what differs between astrometry and photometry: its solver, the mapping
masks the steps name, the star mask of a state, its error model (refreshed before each stage) and
what to do on re-matching. A new step is one more frozen dataclass with a `run` method.
"""

from __future__ import annotations

import abc
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ..config import FitConfig
from ..solver import FitState, SingularSystemError, Solver
from ..solver import outliers

log = logging.getLogger("jcal.calibration")

# The stages before the joint fit prepare its start, not its result: their chi2 tolerance is
# this many times looser (the joint fit redoes what they leave).
WARM_UP_LOOSENING = 100.0


@dataclass(frozen=True)
class HeldOut:
    """Stars held out of the fit to validate it: their (n,) measurements and (S,) prior weights."""

    measurements: np.ndarray
    star_weights: np.ndarray


@dataclass(frozen=True)
class Reassociate:
    """What a recipe returns instead of a state when the fit should start again from `association`."""

    association: Any


@dataclass
class Calibration(abc.ABC):
    """What the recipe's steps need from one calibration (astrometric or photometric).

    mapping_masks: (N,) 0/1 masks of free mapping parameters by the names steps use: "free" (all
        parameters the gauge leaves free) and any other a calibration defines ("first_stage",
        "stars_held"); a step naming a mask the calibration lacks is skipped.
    """

    label: str  # "astrometry" or "photometry", in messages and progress
    solver: Solver
    config: FitConfig
    mapping_masks: dict[str, np.ndarray]
    min_measurements: int
    held_out: HeldOut | None = None
    progress: Callable[[str, float], None] | None = None
    stage_seconds: dict[str, float] = field(default_factory=dict)

    @abc.abstractmethod
    def star_mask(self, state: FitState) -> np.ndarray:
        """(S, q) 1 for star parameters that may move at `state`."""

    def refresh_errors(self, state: FitState, live: bool | None = None) -> None:
        """Bring the error model (per-measurement data of the solver) to `state` before a stage."""

    def anchor_weights(self, state: FitState) -> np.ndarray | None:
        """Weights of an anchored stage (reference-matched measurements alone), or None to use all."""
        return None

    def explain(self, error: SingularSystemError) -> SingularSystemError:
        """The error a singular stage raises, with advice specific to this calibration."""
        return error

    def rematch(self, state: FitState, gain: float) -> FitState | Reassociate:
        """A new association when the fitted state would match enough more reference stars."""
        return state

    def total_chi2(self, state: FitState) -> float:
        c_m, c_s = self.solver.chi2(state)
        return float(c_m.sum() + c_s.sum())


class Step(abc.ABC):
    @abc.abstractmethod
    def run(self, calibration: Calibration, state: FitState) -> FitState | Reassociate:
        """The state after this step."""


def run_recipe(recipe: tuple[Step, ...], calibration: Calibration, state: FitState) -> FitState | Reassociate:
    """Run the steps in order; stop early when one asks to start again from a new association."""
    for step in recipe:
        state = step.run(calibration, state)
        if isinstance(state, Reassociate):
            break
    return state


@dataclass(frozen=True)
class Fit(Step):
    """Gauss-Newton iterations of one stage.

    mapping: the name of the mapping mask that moves (None: the mapping is held).
    stars: whether the stars move.
    anchored: fit on reference-matched measurements alone where they constrain every mapping group
        (their positions are known), else on all.
    warm_up: converge `WARM_UP_LOOSENING` times more loosely (the stage only prepares a later one).
    """

    name: str
    mapping: str | None = None
    stars: bool = False
    anchored: bool = False
    warm_up: bool = False

    def run(self, calibration: Calibration, state: FitState) -> FitState:
        mask = calibration.mapping_masks.get(self.mapping or "free")
        if mask is None:
            return state
        t0 = time.perf_counter()
        config = calibration.config
        calibration.refresh_errors(state)
        tolerance = config.tolerance * (WARM_UP_LOOSENING if self.warm_up else 1.0)

        def stage(start: FitState) -> FitState:
            try:
                return calibration.solver.run_stage(
                    start, self.name, fit_mapping=self.mapping is not None, fit_stars=self.stars,
                    mapping_mask=mask, star_mask=calibration.star_mask(start), max_iterations=config.max_iterations,
                    tolerance=tolerance, line_search=config.line_search)
            except SingularSystemError as error:
                explained = calibration.explain(error)
                if explained is error:
                    raise
                raise explained from error

        anchor = calibration.anchor_weights(state) if self.anchored else None
        if anchor is None:
            new = stage(state)
        else:
            try:
                new = stage(state.replace(weights=anchor)).replace(weights=state.weights)
            except SingularSystemError:
                log.info("%s %s: reference stars alone leave the mapping degenerate; using all", calibration.label,
                         self.name)
                new = stage(state)
        seconds = calibration.stage_seconds
        seconds[self.name] = seconds.get(self.name, 0.0) + time.perf_counter() - t0
        if calibration.progress:
            calibration.progress(f"{calibration.label} {self.name}",
                                 new.history[-1]["chi2"] if new.history else float("nan"))
        return new


@dataclass(frozen=True)
class RejectGross(Step):
    """Gross outliers out before the first joint step, each round followed by `refit`
    (`solver.outliers.reject_gross`)."""

    refit: Fit = Fit("stars", stars=True)

    def run(self, calibration: Calibration, state: FitState) -> FitState:
        config = calibration.config
        return outliers.reject_gross(calibration.solver, state, lambda s: self.refit.run(calibration, s),
                                     calibration.star_mask, n_sigma=config.outlier_sigma,
                                     min_measurements=calibration.min_measurements,
                                     max_rounds=config.max_outlier_rounds, label=calibration.label)


@dataclass(frozen=True)
class RejectUntilClean(Step):
    """Outlier rounds until a full refit leaves nothing to reject; rounds that reject few terms are
    followed by `refit_stars`, the others by `refit` (`solver.outliers.reject_until_clean`)."""

    refit: Fit = Fit("all", mapping="free", stars=True)
    refit_stars: Fit = Fit("stars", stars=True)

    def run(self, calibration: Calibration, state: FitState) -> FitState:
        config = calibration.config
        return outliers.reject_until_clean(
            calibration.solver, state, lambda s: self.refit.run(calibration, s),
            lambda s: self.refit_stars.run(calibration, s), calibration.star_mask, n_sigma=config.outlier_sigma,
            min_measurements=calibration.min_measurements, max_rounds=config.max_outlier_rounds,
            label=calibration.label)


@dataclass(frozen=True)
class FitHeldOut(Step):
    """Fit the held-out stars alone on the final mapping (their measurements stay out of chi2 and
    ndof); the chi2 of their measurements validates the fit (`FitState.held_out_chi2`)."""

    name: str = "held_out"

    def run(self, calibration: Calibration, state: FitState) -> FitState:
        held = calibration.held_out
        if held is None or not held.measurements.any():
            return state
        t0 = time.perf_counter()
        solver, config = calibration.solver, calibration.config
        trial = state.replace(weights=solver.pad_measurements(held.measurements.astype(float)),
                              star_weights=solver.pad_stars(held.star_weights), unusable=None)
        trial = solver.run_stage(trial, self.name, fit_mapping=False, fit_stars=True,
                                 mapping_mask=np.zeros(solver.layout.size), star_mask=calibration.star_mask(state),
                                 max_iterations=config.max_iterations, tolerance=config.tolerance,
                                 line_search=config.line_search)
        chi2 = solver.chi2(trial)[0]
        calibration.stage_seconds[self.name] = time.perf_counter() - t0
        return state.replace(stars=trial.stars, held_out_chi2=np.where(held.measurements, chi2, np.nan))


@dataclass(frozen=True)
class IterateErrors(Step):
    """jointcal's flux errors: held fixed during each solve, refreshed and `fit` again until chi2
    stops changing (at most `max_rounds` times)."""

    fit: Fit = Fit("all", mapping="free", stars=True)
    max_rounds: int = 30

    def run(self, calibration: Calibration, state: FitState) -> FitState:
        calibration.refresh_errors(state, live=False)
        tolerance = calibration.config.tolerance
        for _ in range(self.max_rounds):
            calibration.refresh_errors(state)
            before = calibration.total_chi2(state)
            state = self.fit.run(calibration, state)
            after = calibration.total_chi2(state)
            if abs(before - after) <= tolerance * max(after, 1e-300):
                break
        else:
            log.warning("%s: flux errors not converged after %d refreshes", calibration.label, self.max_rounds)
        calibration.refresh_errors(state)
        return state


@dataclass(frozen=True)
class Rematch(Step):
    """When the fitted stars would match more reference stars than the association did (more than
    `gain` times those it matched), start again from an association through the fitted map."""

    gain: float = 0.01

    def run(self, calibration: Calibration, state: FitState) -> FitState | Reassociate:
        return calibration.rematch(state, self.gain)
