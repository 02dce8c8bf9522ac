"""A converged solution as a differentiable function of the fit's inputs (implicit function theorem)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .problem import FitState, PreparedProblem, flatten_stars
from .programs import implicit


def implicit_function(problem, state: FitState, mapping_mask, star_mask):
    """The converged solution as a differentiable JAX function of the fit's inputs.

    Returns `solution(measurements, references) -> (mapping (N,), stars (S, q))`, where
    `measurements` maps names of per-measurement data arrays (e.g. "x", "y") to (n,) arrays and
    `references` names of per-star prior data (e.g. "ra", "dec") to (S, ...) arrays. Its value
    is the converged fit (evaluate it at the fitted inputs); its derivative is the implicit
    function theorem's, computed in the backward pass by one Schur solve and one
    vector-Jacobian product of the residuals (`implicit_cotangents`), never by unrolling
    iterations. So `jax.grad`/`jax.jacobian` of any scalar of the solution (a star's fitted
    position, the model at a pixel, ...) flow back to centroids and reference positions.

    problem: the `PreparedProblem` the state was fitted on (a `Solver` is accepted too).
    """
    p: PreparedProblem = getattr(problem, "prepared", problem)
    (pm, sm), (ps, ss) = p.split(state.mapping, state.stars)
    theta_m = p.layout.flatten(pm) if p.layout.size else jnp.zeros(0)
    theta_s = flatten_stars(ps)[: p.stars_real]
    smask = p.effective_star_mask(state, star_mask)
    n, s = p.n_real, p.stars_real

    @jax.custom_vjp
    def solution(measurements: dict, references: dict):
        return theta_m, theta_s

    def forward(measurements, references):
        return (theta_m, theta_s), (measurements, references)  # kept only for their keys

    def backward(inputs, bars):
        bar_m, bar_s = bars
        bar_s = jnp.concatenate([bar_s, jnp.zeros((p.n_stars - s, bar_s.shape[1]))])
        data_bar, star_bar = implicit(p.problem.residual_fn, p.problem.prior_fn, p.layout, (pm, sm), (ps, ss),
                                      p.data, p.star_data, p.system, jnp.asarray(state.weights),
                                      jnp.asarray(state.star_weights), mapping_mask, smask, bar_m, bar_s)
        return ({k: data_bar[k][:n] for k in inputs[0]}, {k: star_bar[k][:s] for k in inputs[1]})

    solution.defvjp(forward, backward)
    return solution
