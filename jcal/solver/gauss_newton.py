"""The Gauss-Newton solver of one prepared problem: iterations, damping, line search, convergence.

`Solver(problem)` prepares the problem once (`problem.prepare`) and then runs stages: jitted steps
whose shapes never change (outliers get weight 0 and fixed parameters mask 0 instead of being
removed). Each stage takes a `FitState` and returns a new one. The outlier policy is in
`outliers`, the statistics of a solution (covariances, leave-one-out chi2, singular systems) in
`diagnostics`; the methods of the same names here call them.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from . import diagnostics, outliers, programs
from .normal_equations import Preconditioner
from .problem import (FitError, FitState, PreparedProblem, SingularSystemError, StructuredProblem, flatten_stars,
                      pad_rows, pad_tree, prepare, unflatten_stars)

__all__ = ["FitError", "FitState", "SingularSystemError", "Solver", "StructuredProblem", "flatten_stars",
           "unflatten_stars"]

log = logging.getLogger("jcal.solver")

DAMPINGS = (0.0, 1e-10, 1e-8, 1e-6)  # Levenberg damping, tried only when the undamped system is singular
LINE_SEARCH_HALVINGS = 12


@dataclass
class _Linearisation:
    """The last linearisation and the point it was made at (identity of the arrays): a scoring round
    and the stars-only refit after it linearise at the same point."""

    key: tuple
    terms: Any


class Solver:
    """Runs stages of one prepared problem, keeping what consecutive calls share (the last
    linearisation, the last leave-one-out scores, the preconditioner of joint steps)."""

    def __init__(self, problem: StructuredProblem | PreparedProblem):
        self.prepared = problem if isinstance(problem, PreparedProblem) else prepare(problem)
        self._terms: _Linearisation | None = None
        self._scores: _Linearisation | None = None
        self._preconditioner: Preconditioner | None = None  # from the last assembled joint step
        self._residual_dim: int | None = None

    # -- the prepared problem ------------------------------------------------------------------
    problem = property(lambda self: self.prepared.problem)
    layout = property(lambda self: self.prepared.layout)
    system = property(lambda self: self.prepared.system)
    mapping_filter = property(lambda self: self.prepared.mapping_filter)
    star_filter = property(lambda self: self.prepared.star_filter)
    star_data = property(lambda self: self.prepared.star_data)
    n_real = property(lambda self: self.prepared.n_real)
    stars_real = property(lambda self: self.prepared.stars_real)
    n_measurements = property(lambda self: self.prepared.n_measurements)
    n_stars = property(lambda self: self.prepared.n_stars)
    sizes = property(lambda self: self.prepared.sizes)

    @property
    def data(self) -> dict:
        return self.prepared.data

    def set_data(self, name: str, values) -> None:
        """Replace one per-measurement data array (real size), e.g. refreshed error weights."""
        self.prepared = self.prepared.with_data(name, values)

    def pad_measurements(self, values: np.ndarray, fill: float = 0.0) -> np.ndarray:
        return pad_rows(np.asarray(values), self.n_measurements, fill)

    def pad_stars(self, values: np.ndarray, fill: float = 0.0) -> np.ndarray:
        return pad_rows(np.asarray(values), self.n_stars, fill)

    def new_state(self, mapping, stars, weights, star_weights) -> FitState:
        """A state from real-size stars and weights (padding gets weight 0)."""
        weights = self.pad_measurements(weights)
        return FitState(mapping, pad_tree(stars, self.n_stars), weights, self.pad_stars(star_weights),
                        unusable=weights == 0)

    def real_stars(self, stars):
        return jax.tree.map(lambda a: a[: self.stars_real], stars)

    def split(self, mapping, stars):
        return self.prepared.split(mapping, stars)

    def mapping_mask(self, mask_tree=None) -> np.ndarray:
        return self.prepared.mapping_mask(mask_tree)

    def parameter_names(self) -> list[str]:
        return diagnostics.parameter_names(self.prepared)

    # -- one stage -----------------------------------------------------------------------------
    def run_stage(self, state: FitState, name: str, *, fit_mapping: bool, fit_stars: bool,
                  mapping_mask: jax.Array, star_mask, max_iterations: int, tolerance: float,
                  line_search: bool = True) -> FitState:
        """Gauss-Newton iterations until chi2 changes by less than `tolerance` (relative).

        Args:
            state: the starting point.
            name: the stage's name, for messages and the history.
            fit_mapping, fit_stars: which parameters move.
            mapping_mask: (N,) 1 for free mapping parameters; star_mask: (S, q) for star parameters.
            max_iterations, tolerance: stop after this many steps, or when a step gains less than
                `tolerance` times chi2 (or gains what the linear model predicted, to that precision).
            line_search: halve the step until chi2 does not increase.
        """
        smask = self.prepared.effective_star_mask(state, star_mask)
        if not fit_stars:
            smask = np.zeros_like(smask)
        mmask = mapping_mask if fit_mapping else np.zeros(self.layout.size)
        for iteration in range(max_iterations):
            t0 = time.perf_counter()
            step = self._step(state, name, iteration, fit_mapping, fit_stars, mmask, smask)
            chi2_old = float(step.chi2)
            trial, chi2_new, alpha = self._line_search(state, step, chi2_old, fit_mapping, line_search)
            if not math.isfinite(chi2_new):
                raise FitError(f"stage {name!r}: chi2 exploded to {chi2_new} at iteration {iteration}")
            entry = {"stage": name, "iteration": iteration, "chi2": min(chi2_new, chi2_old), "step_fraction": alpha,
                     "cg_iterations": int(step.iterations), "seconds": time.perf_counter() - t0}
            state = state.replace(history=state.history + (entry,))
            if chi2_new > chi2_old:  # no descent even for tiny steps: at the minimum
                return state
            state = state.replace(mapping=trial.mapping, stars=trial.stars)
            log.debug("stage %s it %d chi2 %.6g -> %.6g (step %.3g)", name, iteration, chi2_old, chi2_new, alpha)
            # converged when the step gained little, or when the linear model predicted the full
            # step's gain exactly (the next step could only gain about that mismatch)
            gain, predicted, scale = chi2_old - chi2_new, float(step.predicted_decrease), max(chi2_new, 1e-300)
            if gain <= tolerance * scale or (alpha == 1.0 and abs(gain - predicted) <= tolerance * scale):
                return state
        log.warning("stage %s: not converged after %d iterations", name, max_iterations)
        return state.replace(converged=False)

    def _step(self, state: FitState, name: str, iteration: int, fit_mapping: bool, fit_stars: bool, mmask, smask):
        """The Gauss-Newton step at `state`, damped (Levenberg) only when the undamped reduced
        system is numerically singular; a structurally singular one raises `SingularSystemError`."""
        terms = self.linear_terms(state, fit_mapping)
        for damping in DAMPINGS:
            step = self._solve(terms, fit_mapping, fit_stars, state.weights, state.star_weights, mmask, smask, damping)
            chi2 = float(step.chi2)
            if not math.isfinite(chi2):
                raise FitError(f"stage {name!r}: chi2 is not finite ({chi2}) at iteration {iteration}; "
                               "check the input for non-finite values or a first-guess WCS far off")
            if bool(step.cholesky_ok) and np.all(np.isfinite(np.asarray(step.delta_mapping))):
                if damping:
                    log.warning("stage %s: near-singular normal equations, damped by %g", name, damping)
                return step
            if damping == 0.0:  # structurally degenerate (null space) or merely ill-conditioned?
                error = diagnostics.singular_error(self.prepared, name, step, mmask, self.residual_dim)
                if error.parameters:
                    raise error
        raise diagnostics.singular_error(self.prepared, name, step, mmask, self.residual_dim)

    def _line_search(self, state: FitState, step, chi2_old: float, fit_mapping: bool, line_search: bool):
        """(trial state, its chi2, step fraction): the step halved until chi2 does not increase."""
        alpha, chi2_new, trial = 1.0, math.inf, state
        for _ in range(LINE_SEARCH_HALVINGS if line_search else 1):
            trial = programs.moved(self.prepared, state, step, alpha, fit_mapping)
            c_m, c_s = programs.chi2(self.prepared, self.linear_terms(trial, False), trial)
            chi2_new = float(c_m.sum() + c_s.sum())
            if chi2_new <= chi2_old * (1 + 1e-12) or not line_search:
                break
            alpha /= 2
        return trial, chi2_new, alpha

    # -- shared work ---------------------------------------------------------------------------
    def linear_terms(self, state: FitState, mapping_jacobian: bool):
        """`normal_equations.linear_terms` at `state`, with the mapping Jacobian if asked; the last
        one is reused at the same point (without the mapping Jacobian when not asked: the programs
        taking it compile once)."""
        mapping_jacobian = bool(mapping_jacobian and self.layout.size)
        key = (state.mapping, state.stars, self.data)
        last = self._terms
        if last is not None and all(a is b for a, b in zip(last.key, key)) and (
                last.terms.jm is not None or not mapping_jacobian):
            return last.terms if mapping_jacobian else last.terms._replace(jm=None)
        self._terms = None  # frees its device memory before the new one is made
        terms = programs.linearise(self.prepared, state, mapping_jacobian)
        self._terms = _Linearisation(key, terms)
        self._residual_dim = int(terms.r.shape[1])
        return terms

    def leave_one_out(self, state: FitState, smask):
        """`normal_equations.leave_one_out_chi2` at `state`; the last result is reused, as a clean
        scoring round and the re-admission that follows it ask for the same one."""
        key = (state.mapping, state.stars, self.data, np.array(state.weights), np.array(state.star_weights),
               np.asarray(smask))
        last = self._scores
        if last is not None and all(a is b for a, b in zip(last.key[:3], key[:3])) and all(
                np.array_equal(a, b) for a, b in zip(last.key[3:], key[3:])):
            return last.terms
        result = programs.leave_one_out(self.prepared, self.linear_terms(state, False), state, smask)
        self._scores = _Linearisation(key, result)
        return result

    def _solve(self, terms, fit_mapping: bool, fit_stars: bool, weights, star_weights, mmask, smask,
               damping: float = 0.0, direct: bool = False):
        step, self._preconditioner = programs.solve(self.prepared, terms, fit_mapping, fit_stars, weights,
                                                    star_weights, mmask, smask, damping, direct, self._preconditioner)
        return step

    @property
    def residual_dim(self) -> int:
        """d: residual components per measurement (2 astrometry, 1 photometry)."""
        if self._residual_dim is None:
            self._residual_dim = diagnostics.residual_dim(self.prepared)
        return self._residual_dim

    # -- statistics and outliers (see `diagnostics` and `outliers`) ----------------------------
    def chi2(self, state: FitState) -> tuple[np.ndarray, np.ndarray]:
        """(n,) measurement and (S,) prior chi2 contributions (real sizes)."""
        c_m, c_s = programs.chi2(self.prepared, self.linear_terms(state, False), state)
        return c_m[: self.n_real], c_s[: self.stars_real]

    def ndof(self, state: FitState, mapping_mask, star_mask) -> int:
        return diagnostics.ndof(self.prepared, state, mapping_mask, star_mask, self.residual_dim)

    def covariance(self, state: FitState, mapping_mask, star_mask) -> np.ndarray:
        return diagnostics.covariance(self, state, mapping_mask, star_mask)

    def star_covariance(self, state: FitState, star_mask) -> np.ndarray:
        return diagnostics.star_covariance(self, state, star_mask)

    def deleted_chi2(self, state: FitState, star_mask) -> np.ndarray:
        return diagnostics.deleted_chi2(self, state, star_mask)

    def reject_outliers(self, state: FitState, n_sigma: float, star_mask, min_measurements: int = 2,
                        **options) -> tuple[FitState, int, int]:
        return outliers.reject(self, state, n_sigma, star_mask, min_measurements, **options)

    def readmit(self, state: FitState, n_sigma: float, star_mask, eligible: np.ndarray) -> tuple[FitState, int]:
        return outliers.readmit(self, state, n_sigma, star_mask, eligible)

    def reject_gross(self, state: FitState, refit_stars, star_mask, **options) -> FitState:
        return outliers.reject_gross(self, state, refit_stars, star_mask, **options)

    def reject_until_clean(self, state: FitState, refit_all, refit_stars, star_mask, **options) -> FitState:
        return outliers.reject_until_clean(self, state, refit_all, refit_stars, star_mask, **options)
