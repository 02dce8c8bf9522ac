"""What the astrometric fit returns (`AstrometryFit`); see `jcal.FitResult` for the user-facing view."""

from __future__ import annotations

from dataclasses import dataclass, field

import equinox as eqx
import jax
import numpy as np

import jcal_models as jm
from jcal_models import MAS, Stars

from ..associate import Association
from ..solver import FitState, PreparedProblem, implicit_function
from ..solver.problem import unflatten_stars
from .fit_result import SolvedProblem


@dataclass
class AstrometryFit(SolvedProblem):
    """The fitted pixel -> sky model and stars, with the state and problem they were fitted from."""

    model: jm.Transform  # fitted pixel -> sky model (full, with group axes)
    stars: Stars
    association: Association
    problem: PreparedProblem
    state: FitState
    mapping_mask: np.ndarray
    star_mask: np.ndarray
    index: dict[str, np.ndarray]
    chi2: float
    ndof: int
    stage_seconds: dict[str, float] = field(default_factory=dict)
    # validation: (m,) bool measurements held out of the fit, and their chi2 (stars refitted alone on
    # the final mapping); None when nothing was held out
    held_out: np.ndarray | None = None
    held_out_chi2: np.ndarray | None = None

    @property
    def weights(self) -> np.ndarray:
        """(n,) 1 for measurements used, 0 for rejected outliers and held-out ones (association order)."""
        return self.state.weights[: self.problem.n_real]

    @property
    def rejected(self) -> np.ndarray:
        """(n,) True for measurements rejected as outliers (held-out ones are not)."""
        out = self.weights == 0
        return out if self.held_out is None else out & ~self.held_out

    @property
    def epoch(self) -> np.ndarray:
        """(n,) epoch [yr] of each measurement (association order)."""
        return np.asarray(self.problem.problem.data["epoch"])[: self.problem.n_real]

    def deleted_chi2_per_measurement(self) -> np.ndarray:
        """(n,) chi2 of each measurement had its star been fitted without it: its expectation is 2
        per measurement when the errors are right, as chi2/ndof's is 1 (0: nothing else constrains
        the star, untestable)."""
        return self._statistics.deleted_chi2(self.state, self.star_mask)

    def star_errors(self) -> dict[str, np.ndarray]:
        """1-sigma errors of the fitted stars (mas, mas/yr), mapping held fixed."""
        cov = self.star_covariance()
        sd = np.sqrt(np.maximum(np.diagonal(cov, axis1=1, axis2=2), 0)) / MAS
        names = ["ra", "dec", "pm_ra", "pm_dec"][: sd.shape[1]]
        return {name: sd[:, i] for i, name in enumerate(names)}

    def differentiable(self):
        """`solution(measurements, references) -> (mapping (N,), stars (S, q))`: the converged
        parameters as a JAX function of the inputs (implicit-function gradients), see
        `jcal.solver.implicit_function`. Build models from them with `model_from`/`stars_from`."""
        return implicit_function(self.problem, self.state, self.mapping_mask, self.star_mask)

    def model_from(self, flat_mapping: jax.Array) -> jm.Transform:
        """The fitted model with its fitted parameters replaced by `flat_mapping` (N,)."""
        pm, sm = eqx.partition(self.model, self.mapping_filter)
        return eqx.combine(self.layout.unflatten(flat_mapping, pm), sm)

    def stars_from(self, flat_stars: jax.Array) -> Stars:
        """The fitted stars with their parameters replaced by `flat_stars` (S, q)."""
        ps, ss = eqx.partition(self.stars, self.problem.star_filter)
        return eqx.combine(unflatten_stars(flat_stars, ps), ss)
