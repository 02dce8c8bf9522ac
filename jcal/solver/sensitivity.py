"""What the normal equations say about a converged solution, beyond the step: each term's
leave-one-out chi2 (outlier scores, star covariances) and the cotangents of the inputs by the
implicit function theorem (gradients through the fit). Pure functions, compiled in `programs`."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from . import small_linalg as small
from .layout import ParameterLayout
from .normal_equations import (System, Terms, _schur_solve, _star_cholesky, _whitened_star_rows, linearise,
                               measurement_terms, star_terms, weigh)


def implicit_cotangents(residual_fn, prior_fn, layout: ParameterLayout, mapping, stars, data, star_data,
                        system: System, weights, star_weights, mapping_mask, star_mask,
                        bar_m: jax.Array, bar_s: jax.Array):
    """Cotangents of the data behind a converged fit, by the implicit function theorem.

    The solution theta*(p) of J^T r = 0 moves with any input p (centroids, reference
    positions, ...) as d theta*/dp = -H^-1 J^T dr/dp (Gauss-Newton H = J^T J). So for a
    cotangent theta_bar of the solution, p_bar = -(dr/dp)^T J H^-1 theta_bar: one Schur solve,
    then one vector-Jacobian product of the residuals with respect to the data.
    bar_m (N,), bar_s (S, q): cotangents of the flat mapping and star parameters.
    Returns (data_bar, star_data_bar): pytrees like `data` and `star_data`.
    """
    star = system.index["star"]
    lin = linearise(residual_fn, prior_fn, mapping, stars, data, star_data, system,
                    weights, star_weights, mapping_mask, star_mask)
    l_s = _star_cholesky(lin.h_ss)
    v_m, v_s, _, _, _, _ = _schur_solve(layout, system, lin, l_s, _whitened_star_rows(lin, l_s, star),
                                        bar_m * mapping_mask, bar_s * star_mask, mapping_mask)
    v_m, v_s = v_m * mapping_mask, v_s * star_mask
    # J v per measurement and per prior (weighted like the residuals)
    jv = jnp.einsum("ndp,np->nd", lin.jm, v_m[system.columns]) + jnp.einsum("ndq,nq->nd", lin.js, v_s[star])
    sw = jnp.sqrt(weights)[:, None]
    _, vjp_data = jax.vjp(lambda d: measurement_terms(residual_fn, mapping, stars, d, system.index,
                                                      with_jacobian=False) * sw, data)
    (data_bar,) = vjp_data(-jv)
    star_data_bar = None
    if prior_fn is not None:
        spw = jnp.sqrt(star_weights)[:, None]
        jpv = jnp.einsum("sdq,sq->sd", lin.jp, v_s)
        _, vjp_star = jax.vjp(lambda d: star_terms(prior_fn, stars, d, with_jacobian=False) * spw, star_data)
        (star_data_bar,) = vjp_star(-jpv)
    return data_bar, star_data_bar


def leave_one_out_chi2(terms: Terms, system: System, weights, star_weights, star_mask):
    """Chi2 of each term had its star been fitted without it: r^T (I - J_s H_ss^-1 J_s^T)^-1 r.

    `terms` come from `linear_terms` (the stars' part is enough); `weights`, `star_weights` and
    `star_mask` as for a step. A raw residual understates an outlier on a star with few
    measurements (the star moves towards it, and the good measurements take the blame); this
    "deleted" chi2 does not. The mapping's leverage is negligible (thousands of measurements per
    group) and ignored. Terms with leverage ~1 (nothing else constrains their star) get chi2 0:
    untestable. Returns ((n,) measurement, (S,) prior) contributions and H_ss^-1 (S, q, q), the
    stars' covariance with the mapping held. A rejected measurement gets its chi2 against the
    current fit, r^T (I + J_s H_ss^-1 J_s^T)^-1 r (it is already outside); a rejected prior gets 0.
    """
    lin = weigh(terms, system, weights, star_weights, None, star_mask, mapping_jacobian=False)
    star = system.index["star"]
    h_inv = small.spd_inverse(lin.h_ss)

    def deleted(r, j, hinv):
        m = jnp.eye(r.shape[0]) - j @ hinv @ j.T  # SPD unless the term is all its star has
        l = small.cholesky(m)
        ok = jnp.all(jnp.diagonal(l) > 1e-3)
        z = small.solve_lower(jnp.where(ok, l, jnp.eye(r.shape[0])), r)
        return jnp.where(ok, z @ z, 0.0)

    chi2_m = jax.vmap(deleted)(lin.r, lin.js, h_inv[star])

    def predicted(r, j, hinv):  # a term outside the fit: noise plus its star's uncertainty
        l = small.cholesky(jnp.eye(r.shape[0]) + j @ hinv @ j.T)
        z = small.solve_lower(l, r)
        return z @ z

    # rejected terms get their chi2 against the current fit (to re-admit the ones rejected early)
    chi2_m = jnp.where(weights > 0, chi2_m, jax.vmap(predicted)(lin.r_all, lin.js_all, h_inv[star]))
    if lin.rp is None:
        return chi2_m, jnp.zeros(lin.h_ss.shape[0]), h_inv
    return chi2_m, jax.vmap(deleted)(lin.rp, lin.jp, h_inv), h_inv
