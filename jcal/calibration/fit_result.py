"""What the two calibrations' results share: the solution as plain data, statistics on demand.

A fit result holds the fitted model and stars, the final `FitState` (weights, history, outlier
counts) and the `PreparedProblem` it was fitted on (immutable: the padded data, the parameter
layout). Statistics that need the linear system (chi2 per measurement, covariances, leave-one-out
chi2, implicit gradients) are computed on demand by a solver over that problem, made when first
asked for; the fit's own solver, its device caches and preconditioner are not kept.
"""

from __future__ import annotations

import functools
import warnings

import numpy as np

from ..solver import FitState, PreparedProblem, Solver


class SolvedProblem:
    """Mixin of `AstrometryFit` and `PhotometryFit`: needs the fields `problem`, `state`,
    `mapping_mask` and `star_mask`."""

    problem: PreparedProblem
    state: FitState
    mapping_mask: np.ndarray
    star_mask: np.ndarray

    @functools.cached_property
    def _statistics(self) -> Solver:
        return Solver(self.problem)

    @property
    def solver(self) -> Solver:
        """Deprecated: a solver over `problem`; use the fit's methods, or `jcal.solver.Solver(fit.problem)`."""
        warnings.warn("fit.solver is deprecated: results keep the prepared problem (fit.problem), not the solver; "
                      "use the fit's methods or jcal.solver.Solver(fit.problem)", DeprecationWarning, stacklevel=2)
        return self._statistics

    @property
    def mapping_filter(self):
        """bool pytree like the model: the fitted leaves."""
        return self.problem.mapping_filter

    @property
    def layout(self):
        """Where each fitted leaf lives in the flat mapping vector (`jcal.solver.ParameterLayout`)."""
        return self.problem.layout

    @property
    def sizes(self) -> dict:
        """Sizes of the problem (measurements, stars, parameters, padding, tiles, fill GFlop)."""
        return self.problem.sizes

    def chi2_per_measurement(self) -> np.ndarray:
        """(n,) chi2 of each measurement at the solution (0 for rejected ones)."""
        return self._statistics.chi2(self.state)[0]

    def mapping_covariance(self) -> np.ndarray:
        """(N, N) covariance of the mapping parameters, marginalised over the stars (not rescaled by chi2/ndof)."""
        if "_covariance" not in self.__dict__:
            self.__dict__["_covariance"] = self._statistics.covariance(self.state, self.mapping_mask, self.star_mask)
        return self.__dict__["_covariance"]

    def star_covariance(self) -> np.ndarray:
        """(S, q, q) covariance of each star's parameters, the mapping held at its fit."""
        return self._statistics.star_covariance(self.state, self.star_mask)
