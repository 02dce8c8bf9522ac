"""What a solution's linear system says about it: degrees of freedom, covariances, leave-one-out
chi2, and, when the system is singular, which parameters make it so."""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

from .normal_equations import measurement_terms
from .problem import FitState, PreparedProblem, SingularSystemError

if TYPE_CHECKING:
    from .gauss_newton import Solver


def residual_dim(p: PreparedProblem) -> int:
    """d: residual components per measurement, from the residual traced for its shape (~0.1 s)."""
    (pm, sm), (ps, ss) = p.split(p.problem.mapping, p.problem.stars)
    first = jax.tree.map(lambda a: a[:1], p.data)
    idx = {k: v[:1] for k, v in p.system.index.items()}
    shape = jax.eval_shape(lambda: measurement_terms(p.problem.residual_fn, (pm, sm), (ps, ss), first, idx,
                                                     with_jacobian=False))
    return int(shape.shape[1])


def ndof(p: PreparedProblem, state: FitState, mapping_mask, star_mask, dim: int) -> int:
    """Residuals in use (measurements times `dim`, plus prior components) less free parameters."""
    n_res = dim * float(np.sum(state.weights))
    if p.problem.prior_dof is not None:
        n_res += float(np.sum(state.star_weights * p.problem.prior_dof))
    smask = np.asarray(p.effective_star_mask(state, star_mask))
    return int(round(n_res - float(np.sum(np.asarray(mapping_mask))) - float(smask.sum())))


def covariance(solver: "Solver", state: FitState, mapping_mask, star_mask) -> np.ndarray:
    """(N, N) covariance of the mapping parameters marginalised over the stars: the inverse
    of the reduced normal matrix of a full step (fixed parameters: zero rows and columns)."""
    smask = solver.prepared.effective_star_mask(state, star_mask)
    step = solver._solve(solver.linear_terms(state, True), True, True, state.weights, state.star_weights,
                         jnp.asarray(mapping_mask), smask, direct=True)
    diag = np.asarray(step.reduced_diagonal)
    d = 1.0 / np.sqrt(np.where(diag > 0, diag, 1.0))
    factor = scipy.linalg.cho_factor(np.asarray(step.scaled_matrix), lower=True)
    cov = d[:, None] * scipy.linalg.cho_solve(factor, np.diag(d))
    free = np.asarray(mapping_mask) > 0
    return np.where(free[:, None] & free[None, :], cov, 0.0)


def star_covariance(solver: "Solver", state: FitState, star_mask) -> np.ndarray:
    """(S, q, q) covariance of each star's parameters with the mapping held at its fit
    (the conditional covariance; the mapping adds a little, see `covariance`)."""
    smask = solver.prepared.effective_star_mask(state, star_mask)
    _, _, h_inv = solver.leave_one_out(state, smask)
    cov = np.asarray(h_inv) * np.asarray(smask)[:, :, None] * np.asarray(smask)[:, None, :]
    return cov[: solver.stars_real]


def deleted_chi2(solver: "Solver", state: FitState, star_mask) -> np.ndarray:
    """(n,) each measurement's leave-one-out chi2 (`leave_one_out_chi2`): the errors of chi2,
    with its star's share of the degrees of freedom; 0 where nothing else constrains the star."""
    smask = solver.prepared.effective_star_mask(state, star_mask)
    return np.asarray(solver.leave_one_out(state, smask)[0])[: solver.n_real]


def parameter_names(p: PreparedProblem) -> list[str]:
    """Readable name of every flat mapping parameter."""
    pm, _ = p.split(p.problem.mapping, p.problem.stars)[0]
    names = []
    for (path, _leaf), key, g, size in zip(jax.tree_util.tree_flatten_with_path(pm)[0], p.layout.keys,
                                           p.layout.n_groups, p.layout.row_sizes):
        label = jax.tree_util.keystr(path)
        names += [f"{label}[{key} {gi}, element {e}]" for gi in range(g) for e in range(size)]
    return names


def singular_error(p: PreparedProblem, name: str, step, mmask, dim: int) -> SingularSystemError:
    """Name what makes the reduced system singular: parameters with no information, groups
    with fewer residuals than parameters, and (given `step.scaled_matrix`) the parameters
    spanning its null space. An error with no `parameters` means: ill-conditioned only."""
    diag = np.asarray(step.reduced_diagonal)
    free = np.asarray(mmask) > 0
    scale = np.median(diag[free]) if free.any() else 1.0
    weak = np.flatnonzero(free & (diag <= 1e-10 * scale))
    names = parameter_names(p)
    named = [names[i] for i in weak[:20]]
    # groups with fewer residuals than parameters cannot be determined whatever the data
    starved = []
    for key, n_groups, size in zip(p.layout.keys, p.layout.n_groups, p.layout.row_sizes):
        if key in p.problem.index:
            counts = np.bincount(p.problem.index[key], minlength=n_groups) * dim
            starved += [f"{key} {g} ({counts[g]} residuals for {size} parameters)"
                        for g in np.flatnonzero(counts < size)[:10]]
    null = []
    if step.scaled_matrix is not None and not named and not starved:
        h = np.asarray(step.scaled_matrix)[np.ix_(free, free)]
        values, vectors = np.linalg.eigh(h)
        small = values < 1e-10 * max(values[-1], 1e-300)
        if small.any():  # exact degeneracy: name the parameters that move along it
            weight = np.abs(vectors[:, small]).max(axis=1)
            null = [names[i] for i in np.flatnonzero(free)[np.argsort(-weight)[:10]]]
            null = [f"{int(small.sum())} degenerate direction(s) involving " + ", ".join(null[:5])]
    return SingularSystemError(
        f"stage {name!r}: the normal equations are singular; {len(weak)} mapping parameter(s) have no "
        f"constraint (e.g. {named[:5]}); under-determined groups: {starved or 'none found'}; "
        f"{null[0] if null else 'no exact null space found'}. Fix the gauge (see the model form's "
        "fix_gauge), lower the polynomial order, add data, or freeze parameters.", named + starved + null)
