"""The structured solver against a dense least-squares solve of the same small problem."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jcal_models as jm
from jcal.solver import SingularSystemError, Solver, StructuredProblem


class Points(eqx.Module):
    pos: jax.Array  # (S, 2)

    def __call__(self):
        return self.pos


class TwoMaps(jm.Transform):
    chip: jm.Grouped
    visit: jm.Grouped

    def __call__(self, x, y):
        return self.visit(*self.chip(x, y))


def residual(model, star, d):
    u, v = model(d["x"], d["y"])
    return jnp.stack([u - star.pos[0], v - star.pos[1]]) / d["sigma"]


def prior(star, d):
    return (star.pos - d["pos"]) / d["sigma"] * d["has"]


def make_problem(seed=0, n_stars=60, n_visits=4, n_chips=3, stars_per_tile=8):
    rng = np.random.default_rng(seed)
    pos = rng.uniform(-1, 1, (n_stars, 2))

    def poly(n, order, scale):
        c = rng.normal(0, scale, (n, 2, jm.n_terms(order)))
        c[:, 0, 1] += 1.0
        c[:, 1, 2] += 1.0
        return jm.Grouped(jm.Polynomial(coeffs=jnp.asarray(c), center=jnp.zeros((n, 2)),
                                        half_width=jnp.ones((n, 2)), order=order), by=by[0])

    by = ["detector"]
    chip = poly(n_chips, 1, 0.01)
    by = ["visit"]
    visit = poly(n_visits, 2, 0.01)
    truth = TwoMaps(chip, visit)
    rows = []
    for s in range(n_stars):
        for v in range(n_visits):
            d = rng.integers(n_chips)
            rows.append((s, v, d))
    rows = np.array(rows)
    # invert the truth numerically by GN on the pixel position (small problem, fine)
    xy = pos[rows[:, 0]].copy()
    for _ in range(20):
        f = jax.vmap(lambda p, v, d: jnp.stack(jm.gather(truth, {"visit": v, "detector": d})(p[0], p[1])))
        jac = jax.vmap(jax.jacfwd(lambda p, v, d: jnp.stack(jm.gather(truth, {"visit": v, "detector": d})(p[0], p[1]))))
        r = np.asarray(f(jnp.asarray(xy), rows[:, 1], rows[:, 2])) - pos[rows[:, 0]]
        xy -= np.linalg.solve(np.asarray(jac(jnp.asarray(xy), rows[:, 1], rows[:, 2])), r[..., None])[..., 0]
    sigma = 0.001
    xy += rng.normal(0, sigma, xy.shape)
    start = TwoMaps(
        jm.Grouped(eqx.tree_at(lambda p: p.coeffs, chip.inner, chip.inner.coeffs * 0.98), by="detector"),
        jm.Grouped(eqx.tree_at(lambda p: p.coeffs, visit.inner, visit.inner.coeffs * 1.01), by="visit"))
    # gauge: chip 0 at its true value
    start = eqx.tree_at(lambda m: m.chip.inner.coeffs, start, start.chip.inner.coeffs.at[0].set(chip.inner.coeffs[0]))
    has = (np.arange(n_stars) % 3 == 0).astype(float)[:, None]
    problem = StructuredProblem(
        residual_fn=residual, prior_fn=prior, mapping=start,
        stars=Points(jnp.asarray(pos + rng.normal(0, 0.01, pos.shape))),
        data={"x": xy[:, 0], "y": xy[:, 1], "sigma": np.full(len(rows), sigma)},
        star_data={"pos": pos, "sigma": np.full((n_stars, 2), 0.002), "has": np.repeat(has, 2, 1)},
        index={"star": rows[:, 0], "visit": rows[:, 1], "detector": rows[:, 2]},
        star_xyz=np.c_[pos, np.ones(n_stars)] / np.linalg.norm(np.c_[pos, np.ones(n_stars)], axis=1)[:, None],
        prior_dof=2 * has[:, 0], stars_per_tile=stars_per_tile)
    return problem, truth


def gauge_mask(solver, start):
    pm, _ = eqx.partition(start, solver.mapping_filter)
    mask = jax.tree.map(jnp.ones_like, pm)
    mask = eqx.tree_at(lambda m: m.chip.inner.coeffs, mask, mask.chip.inner.coeffs.at[0].set(0.0))
    return solver.mapping_mask(mask)


def dense_solution(problem, solver, mmask):
    """Minimise the same chi2 with a dense Jacobian (only possible on toy sizes)."""
    (pm, sm), (ps, ss) = solver.split(problem.mapping, problem.stars)
    free = np.flatnonzero(np.asarray(mmask))
    x0m = solver.layout.flatten(pm)
    x0s = ps.pos.ravel()

    def res(theta):
        vm = x0m.at[free].set(theta[: len(free)])
        mapping = eqx.combine(solver.layout.unflatten(vm, pm), sm)
        stars = Points(theta[len(free):].reshape(-1, 2))
        idx = {k: jnp.asarray(v) for k, v in problem.index.items()}
        r = jax.vmap(lambda i: residual(jm.gather(mapping, {"visit": idx["visit"][i], "detector": idx["detector"][i]}),
                                        Points(stars.pos[idx["star"][i]]),
                                        {k: jnp.asarray(v)[i] for k, v in problem.data.items()}))(jnp.arange(len(idx["star"])))
        rp = jax.vmap(lambda s: prior(Points(stars.pos[s]), {k: jnp.asarray(v)[s] for k, v in problem.star_data.items()}))(
            jnp.arange(stars.pos.shape[0]))
        return jnp.concatenate([r.ravel(), rp.ravel()])

    theta = jnp.concatenate([x0m[free], x0s])
    for _ in range(10):
        r = res(theta)
        j = jax.jacfwd(res)(theta)
        theta = theta - jnp.linalg.lstsq(j, r)[0]
    return theta, float(jnp.sum(res(theta) ** 2)), free


@pytest.mark.parametrize("stars_per_tile, reuse_factor", [(8, False), (64, False), (8, True)])
def test_schur_solution_matches_dense_least_squares(stars_per_tile, reuse_factor):
    problem, truth = make_problem(stars_per_tile=stars_per_tile)
    problem.reuse_factor = reuse_factor
    solver = Solver(problem)
    mmask = gauge_mask(solver, problem.mapping)
    state = solver.new_state(problem.mapping, problem.stars, np.ones(len(problem.index["star"])), np.ones(60))
    state = solver.run_stage(state, "all", fit_mapping=True, fit_stars=True, mapping_mask=mmask,
                             star_mask=np.ones((60, 2)), max_iterations=10, tolerance=1e-12)
    theta, chi2_dense, free = dense_solution(problem, solver, mmask)
    # with reuse_factor, every step solves by conjugate gradients (assembled: 0 iterations), the
    # first preconditioned by its own float32-fill factor, the next ones by that one
    cg = [h["cg_iterations"] for h in state.history]
    assert len(cg) > 1 and (all(k > 0 for k in cg) if reuse_factor else not any(cg))
    c_m, c_s = solver.chi2(state)
    assert abs(c_m.sum() + c_s.sum() - chi2_dense) < 1e-6 * chi2_dense
    (pm, _), (ps, _) = solver.split(state.mapping, solver.real_stars(state.stars))
    np.testing.assert_allclose(np.asarray(solver.layout.flatten(pm))[free], np.asarray(theta[: len(free)]),
                               atol=1e-9)
    np.testing.assert_allclose(np.asarray(ps.pos).ravel(), np.asarray(theta[len(free):]), atol=1e-9)
    # ndof = residuals - free parameters; chi2/ndof ~ 1 for correctly weighted noise
    ndof = solver.ndof(state, mmask, np.ones((60, 2)))
    assert ndof == 2 * 240 + 2 * 20 - int(mmask.sum()) - 120
    assert 0.6 < (c_m.sum() + c_s.sum()) / ndof < 1.5


def test_conjugate_gradients_short_of_convergence_fall_back_to_assembly(monkeypatch):
    """Conjugate gradients that do not converge in time (here: no iteration allowed): the step
    assembles the exact matrix instead (and keeps its factor), so the fit is the same."""
    import jcal.solver.programs as programs

    monkeypatch.setattr(programs, "CG_ITERATIONS", 0)
    problem, _ = make_problem()
    problem.reuse_factor = True
    solver = Solver(problem)
    mmask = gauge_mask(solver, problem.mapping)
    state = solver.new_state(problem.mapping, problem.stars, np.ones(240), np.ones(60))
    state = solver.run_stage(state, "all", fit_mapping=True, fit_stars=True, mapping_mask=mmask,
                             star_mask=np.ones((60, 2)), max_iterations=10, tolerance=1e-12)
    assert [h["cg_iterations"] for h in state.history] == [0] * len(state.history)
    _, chi2_dense, _ = dense_solution(problem, solver, mmask)
    c_m, c_s = solver.chi2(state)
    assert abs(c_m.sum() + c_s.sum() - chi2_dense) < 1e-6 * chi2_dense


def test_degenerate_system_names_parameters():
    problem, _ = make_problem()
    solver = Solver(problem)
    state = solver.new_state(problem.mapping, problem.stars, np.ones(240), np.ones(60))
    with pytest.raises(SingularSystemError) as err:  # no gauge: chip/visit degenerate
        solver.run_stage(state, "all", fit_mapping=True, fit_stars=True, mapping_mask=solver.mapping_mask(),
                         star_mask=np.ones((60, 2)), max_iterations=3, tolerance=1e-12)
    assert "singular" in str(err.value)


def test_outlier_is_rejected():
    problem, _ = make_problem()
    problem.data["x"][17] += 0.05  # 50 sigma
    solver = Solver(problem)
    mmask = gauge_mask(solver, problem.mapping)
    state = solver.new_state(problem.mapping, problem.stars, np.ones(240), np.ones(60))
    for _ in range(5):
        state = solver.run_stage(state, "all", fit_mapping=True, fit_stars=True, mapping_mask=mmask,
                                 star_mask=np.ones((60, 2)), max_iterations=10, tolerance=1e-10)
        state, n_m, n_s = solver.reject_outliers(state, 5.0, np.ones((60, 2)))
        if n_m + n_s == 0:
            break
    assert state.weights[17] == 0
    assert state.weights.sum() >= 238
    assert len(state.weights) == solver.n_measurements >= 240  # padded to a bucketed size


def test_gross_round_takes_only_gross_outliers():
    """Before the joint fit, only terms far beyond the cut go (GROSS_FACTOR); the rounds after
    the joint fit take the rest, and re-admission can bring back any gross-round rejection."""
    import jcal.solver.outliers as gn

    problem, _ = make_problem()
    problem.data["x"][17] += 0.05  # 50 sigma: gross
    problem.data["y"][101] += 0.008  # 8 sigma: an outlier, but not gross
    solver = Solver(problem)
    mmask = gauge_mask(solver, problem.mapping)
    state = solver.new_state(problem.mapping, problem.stars, np.ones(240), np.ones(60))
    stars = np.ones((60, 2))

    def refit(st, fit_mapping):
        return solver.run_stage(st, "all" if fit_mapping else "stars", fit_mapping=fit_mapping, fit_stars=True,
                                mapping_mask=mmask, star_mask=stars, max_iterations=10, tolerance=1e-10)

    state = refit(state, True)  # stands in for the mapping and stars stages
    state = solver.reject_gross(state, lambda st: refit(st, False), lambda st: stars, n_sigma=5.0,
                                min_measurements=2, max_rounds=5, label="test")
    assert gn.GROSS_FACTOR * 5.0 < 50
    assert state.weights[17] == 0 and state.weights[101] == 1
    state = refit(state, True)
    state = solver.reject_until_clean(state, lambda st: refit(st, True), lambda st: refit(st, False),
                                      lambda st: stars, n_sigma=5.0, min_measurements=2, max_rounds=5, label="test")
    assert state.weights[17] == 0 and state.weights[101] == 0
    assert state.weights.sum() >= 237
