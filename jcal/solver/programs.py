"""The compiled programs of a fit, and thin host functions that call them on a `PreparedProblem`.

A step runs as two programs, `linear_terms` then `solve_step`: the linearisation (autodiff of the
model, the costliest program to compile and to run) is shared by every kind of step and by the
outlier scoring, is computed once per point (a scoring round and the stars-only refit after it
reuse it), and a damped retry re-solves without linearising again. Programs that are cheap to run
compile for compile speed (`compile.brief_jit`); small problems (`PreparedProblem.brief`) compile
every program that way.
"""

from __future__ import annotations

import functools
import logging

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .compile import brief_jit
from .layout import ParameterLayout, bucket
from .normal_equations import Preconditioner, chi2_terms, linear_terms, solve_step
from .problem import FitState, PreparedProblem, flatten_stars, unflatten_stars
from .sensitivity import implicit_cotangents, leave_one_out_chi2

log = logging.getLogger("jcal.solver")

CG_ITERATIONS = 30  # conjugate-gradient iterations before a joint step assembles its matrix instead

_terms = jax.jit(linear_terms, static_argnames=("residual_fn", "prior_fn", "mapping_jacobian"))
_terms_brief = brief_jit(linear_terms, static_argnames=("residual_fn", "prior_fn", "mapping_jacobian"))
_solve_joint = jax.jit(solve_step, static_argnames=("layout", "fit_mapping", "fit_stars"))
_solve_brief = brief_jit(solve_step, static_argnames=("layout", "fit_mapping", "fit_stars"))
_solve_cg = jax.jit(solve_step, static_argnames=("layout", "fit_mapping", "fit_stars", "precondition",
                                                 "cg_iterations"))
_chi2 = brief_jit(chi2_terms)
_deleted_chi2 = brief_jit(leave_one_out_chi2)
implicit = jax.jit(implicit_cotangents, static_argnums=(0, 1, 2))


def linearise(p: PreparedProblem, state: FitState, mapping_jacobian: bool):
    """`normal_equations.linear_terms` at `state` (residuals, star Jacobians, and the mapping
    Jacobian when asked and the mapping has free parameters)."""
    (pm, sm), (ps, ss) = p.split(state.mapping, state.stars)
    run = _terms_brief if p.brief else _terms
    return run(residual_fn=p.problem.residual_fn, prior_fn=p.problem.prior_fn, mapping=(pm, sm), stars=(ps, ss),
               data=p.data, star_data=p.star_data, index=p.system.index,
               mapping_jacobian=bool(mapping_jacobian and p.layout.size))


def chi2(p: PreparedProblem, terms, state: FitState) -> tuple[np.ndarray, np.ndarray]:
    """(n,) measurement and (S,) prior chi2 contributions (padded sizes) from `terms` at `state`."""
    c_m, c_s = _chi2(terms, jnp.asarray(state.weights), jnp.asarray(state.star_weights))
    return np.asarray(c_m), np.asarray(c_s)


def leave_one_out(p: PreparedProblem, terms, state: FitState, smask):
    """`normal_equations.leave_one_out_chi2` at `state`: (d_m (n,), d_s (S,), per-star inverse Hessians)."""
    return _deleted_chi2(terms, p.system_for(False, False), jnp.asarray(state.weights),
                         jnp.asarray(state.star_weights), smask)


def solve(p: PreparedProblem, terms, fit_mapping: bool, fit_stars: bool, weights, star_weights, mmask, smask,
          damping: float = 0.0, direct: bool = False, preconditioner: Preconditioner | None = None):
    """One Gauss-Newton step from `terms`; returns (step, preconditioner for the next joint step).

    With `p.reuse_factor` (undamped, not `direct`), a joint step solves by conjugate gradients,
    preconditioned by the factor of an earlier step's reduced matrix, or for the first one by its
    own with the fill in float32 (half the work), kept for the next; if they do not converge,
    the step assembles the exact matrix (and keeps its factor)."""
    joint = fit_mapping and fit_stars and p.layout.size > 0
    args = (jnp.asarray(weights), jnp.asarray(star_weights), mmask, smask, damping)
    reuse = joint and p.reuse_factor and damping == 0.0
    if reuse and not direct:
        fresh = preconditioner is None  # then the step assembles one, and needs the tiles
        step = _solve_cg(p.layout, True, True, terms, p.system_for(True, fresh), *args, preconditioner=preconditioner,
                         precondition=fresh, cg_iterations=CG_ITERATIONS)
        if bool(step.cholesky_ok):
            return step, Preconditioner.of(step) if fresh else preconditioner
        log.debug("conjugate gradients short of convergence after %d iterations: assembling the reduced matrix",
                  int(step.iterations))
    run = _solve_joint if fit_mapping and fit_stars and not p.brief else _solve_brief
    step = run(p.layout, fit_mapping, fit_stars, terms, p.system_for(fit_mapping, fit_stars), *args)
    if reuse and bool(step.cholesky_ok):
        preconditioner = Preconditioner.of(step)
    return step, preconditioner


def moved(p: PreparedProblem, state: FitState, step, alpha: float, move_mapping: bool = True) -> FitState:
    """The state moved by alpha times the step (the mapping object kept when it does not move)."""
    move_mapping = bool(move_mapping and p.layout.size)
    (pm, _), (ps, _) = p.split(state.mapping, state.stars)
    new_pm, new_ps = _moved(p.layout, move_mapping, pm, ps, step.delta_mapping, step.delta_stars, alpha)
    mapping = (eqx.combine(new_pm, eqx.filter(state.mapping, p.mapping_filter, inverse=True)) if move_mapping
               else state.mapping)
    stars = eqx.combine(new_ps, eqx.filter(state.stars, p.star_filter, inverse=True))
    return state.replace(mapping=mapping, stars=stars)


@functools.partial(brief_jit, static_argnums=(0, 1))
def _moved(layout: ParameterLayout, move_mapping: bool, pm, ps, delta_mapping, delta_stars, alpha):
    """Parameters moved by alpha times a step (one program, not one per eager operation)."""
    new_ps = unflatten_stars(flatten_stars(ps) + alpha * delta_stars, ps)
    if not move_mapping:
        return pm, new_ps
    return layout.unflatten(layout.flatten(pm) + alpha * delta_mapping, pm), new_ps


_take = brief_jit(lambda arrays, rows: tuple(a[rows] for a in arrays))


def host_rows(arrays: tuple[jax.Array, ...], rows: np.ndarray) -> list[np.ndarray]:
    """a[rows] for each of `arrays`, gathered on the device in one program and fetched (rows
    padded to a bucketed count, so that few programs compile; eager indexing would compile one
    per array and count)."""
    padded = np.zeros(bucket(len(rows), minimum=1), np.int64)
    padded[: len(rows)] = rows
    return [np.asarray(a)[: len(rows)] for a in _take(tuple(arrays), jnp.asarray(padded))]
