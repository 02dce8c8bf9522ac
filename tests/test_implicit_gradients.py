"""Gradients through the converged fit (implicit function theorem) against finite differences."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jcal
import jcal_models as jm


@pytest.fixture(scope="module")
def fitted():
    sim = jcal.simulate("tiny", seed=2)
    config = jcal.FitConfig(visit_order=2, photometry=False, max_outlier_rounds=0, tolerance=1e-14)
    return sim, jcal.fit(sim.data, config).astrometry


def _converged(fit, problem):
    """The fit's state re-converged on `problem` (the fit's, with some inputs changed)."""
    solver = jcal.solver.Solver(problem)
    state = jcal.solver.FitState(fit.state.mapping, fit.state.stars, fit.state.weights, fit.state.star_weights)
    state = solver.run_stage(state, "fd", fit_mapping=True, fit_stars=True, mapping_mask=fit.mapping_mask,
                             star_mask=fit.star_mask, max_iterations=6, tolerance=1e-15)
    return solver.split(state.mapping, state.stars)


def _refit(fit, **changes):
    """Re-converge the same problem with some measurement data changed (finite differences)."""
    problem = fit.problem
    for name, values in changes.items():
        problem = problem.with_data(name, values)
    (pm, _), (ps, _) = _converged(fit, problem)
    return np.asarray(fit.layout.flatten(pm)), np.asarray(jcal.solver.problem.flatten_stars(ps))


def test_gradient_of_fitted_star_and_mapping_matches_refits(fitted):
    sim, fit = fitted
    solution = fit.differentiable()
    x = jnp.asarray(np.asarray(fit.problem.data["x"])[: fit.problem.n_real])
    y = jnp.asarray(np.asarray(fit.problem.data["y"])[: fit.problem.n_real])
    i = 7
    star = int(fit.association.star[i])

    def objective(x):  # a star's fitted offset plus the fitted model's sky position at a pixel
        theta_m, theta_s = solution({"x": x, "y": y}, {})
        model = fit.model_from(theta_m)
        ra, dec = jm.evaluate(model, {"visit": jnp.array([0]), "detector": jnp.array([0]),
                                      "ccd_visit": jnp.array([0])}, jnp.array([100.0]), jnp.array([200.0]))
        return theta_s[star, 0] * 3.6e6 + dec[0] * 3.6e6  # mas

    grad = np.asarray(jax.grad(objective)(x))
    h = 1e-3  # pixels
    values = []
    for sign in (+1, -1):
        xs = np.asarray(x).copy()
        xs[i] += sign * h
        theta_m, theta_s = _refit(fit, x=xs)
        model = fit.model_from(jnp.asarray(theta_m))
        _, dec = jm.evaluate(model, {"visit": jnp.array([0]), "detector": jnp.array([0]),
                                     "ccd_visit": jnp.array([0])}, jnp.array([100.0]), jnp.array([200.0]))
        values.append(theta_s[star, 0] * 3.6e6 + float(dec[0]) * 3.6e6)
    fd = (values[0] - values[1]) / (2 * h)
    assert abs(grad[i]) > 1.0  # mas per pixel: the star follows its own centroid
    np.testing.assert_allclose(grad[i], fd, rtol=2e-3)


def test_gradient_with_respect_to_reference_positions(fitted):
    sim, fit = fitted
    problem = fit.problem
    solution = fit.differentiable()
    ra = jnp.asarray(np.asarray(problem.star_data["ra"])[: problem.stars_real])
    star = int(np.flatnonzero(fit.association.star_ref >= 0)[0])
    g = np.asarray(jax.grad(lambda ra: solution({}, {"ra": ra})[1][star, 0])(ra))
    assert np.isfinite(g).all() and abs(g[star]) > 0  # a star is pulled by its own reference position
    h = 1e-6  # deg
    values = []
    for sign in (+1, -1):
        shifted = np.asarray(problem.star_data["ra"]).copy()
        shifted[star] += sign * h
        changed = dataclasses.replace(problem, star_data=dict(problem.star_data, ra=jnp.asarray(shifted)))
        (_, _), (ps, _) = _converged(fit, changed)
        values.append(float(jcal.solver.problem.flatten_stars(ps)[star, 0]))
    np.testing.assert_allclose(g[star], (values[0] - values[1]) / (2 * h), rtol=2e-3)
