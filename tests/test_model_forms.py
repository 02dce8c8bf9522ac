"""The extra model forms (`jcal_models.extra`): evaluate, differentiate, fit, freeze."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jcal
import jcal_models as jm
from jcal.associate import associate
from jcal.calibration.initialise import initial_astrometric_model
from jcal_models import extra

FACTORIES = {
    "radial": lambda init: extra.radial_astrometry(init, k=(1e-4, -2e-5)),
    "pixel_grid": lambda init: extra.pixel_grid_astrometry(init, nodes=4),
    "turbulent": lambda init: extra.turbulent_astrometry(init, nodes=3),
}
CONFIG = jcal.FitConfig(visit_order=3, photometry=False)


@pytest.fixture(scope="module")
def setup():
    sim = jcal.simulate("tiny", seed=1)
    assoc = associate(sim.data, CONFIG)
    init = initial_astrometric_model(sim.data, assoc, CONFIG)
    core = jcal.fit(sim.data, CONFIG)
    return sim, init, core


def _perturbed(model):
    """Non-zero grid values so the derivative test exercises every term."""
    rng = np.random.default_rng(1)
    if hasattr(model, "grid"):
        off = model.grid.inner.offsets
        model = jax.tree_util.tree_map(lambda a: a, model)
        return eqx_set(model, lambda m: m.grid.inner.offsets, jnp.asarray(rng.normal(0, 0.5, off.shape)))
    if hasattr(model.visit.inner, "field"):
        f = model.visit.inner.field
        return eqx_set(model, lambda m: m.visit.inner.field, jnp.asarray(rng.normal(0, 1e-5, f.shape)))
    return model


def eqx_set(model, where, value):
    import equinox as eqx
    return eqx.tree_at(where, model, value)


@pytest.mark.parametrize("name", FACTORIES)
def test_evaluate_and_gradient(setup, name):
    _, init, _ = setup
    model = _perturbed(FACTORIES[name](init))
    idx = {"detector": jnp.array([0, 1, 2]), "visit": jnp.array([0, 1, 3]), "ccd_visit": jnp.array([0, 1, 2])}
    x, y = jnp.array([10.0, 500.0, 1500.0]), jnp.array([20.0, 800.0, 1000.0])
    ra, dec = jm.evaluate(model, idx, x, y)
    ra0, dec0 = jm.evaluate(init, idx, x, y)
    assert np.all(np.isfinite(ra)) and np.all(np.isfinite(dec))
    assert np.max(np.abs(np.asarray(dec - dec0))) < 1e-2  # close to the first guess it starts from

    one = {k: v[1] for k, v in idx.items()}
    params, static = jm_partition(model)

    def f(p):
        import equinox as eqx
        m = eqx.combine(p, static)
        r, d = jm.gather(m, one)(x[1], y[1])
        return r * 3.6e3 + d * 3.6e3  # arcsec
    grad = jax.grad(f)(params)
    leaves, tdef = jax.tree.flatten(params)
    gl = jax.tree.leaves(grad)
    rng = np.random.default_rng(0)
    for leaf, g in zip(leaves, gl):
        flat = np.asarray(leaf).ravel()
        nz = np.flatnonzero(np.asarray(g).ravel())
        picks = rng.choice(nz, size=min(3, len(nz)), replace=False) if len(nz) else []
        for k in picks:
            h = 1e-4 * max(1.0, abs(flat[k]))
            def shifted(delta):
                new = flat.copy()
                new[k] += delta
                ls = [jnp.asarray(new.reshape(leaf.shape)) if lf is leaf else lf for lf in leaves]
                return f(jax.tree.unflatten(tdef, ls))
            fd = (shifted(h) - shifted(-h)) / (2 * h)
            assert np.isclose(float(np.asarray(g).ravel()[k]), float(fd), rtol=1e-3, atol=1e-6)
    # derivative w.r.t. pixels, too
    gx = jax.grad(lambda xx: jm.gather(model, one)(xx, y[1])[1])(x[1])
    fdx = (jm.gather(model, one)(x[1] + 1e-3, y[1])[1] - jm.gather(model, one)(x[1] - 1e-3, y[1])[1]) / 2e-3
    assert np.isclose(float(gx), float(fdx), rtol=1e-5)


def jm_partition(model):
    import equinox as eqx
    return eqx.partition(model, jm.parameter_filter(model))


@pytest.mark.parametrize("name", [
    "radial", "pixel_grid", "turbulent",
])
def test_fits_tiny_survey(setup, name):
    sim, init, core = setup
    result = jcal.fit(sim.data, CONFIG, astrometry_model=FACTORIES[name](init))
    c, c0 = result.metrics["astrometry_chi2_per_ndof"], core.metrics["astrometry_chi2_per_ndof"]
    print(name, c, c0)
    assert abs(c / c0 - 1) < 0.1


def test_freeze_chip(setup):
    """Keep the chip mappings of a previous fit fixed and refit only the visit terms."""
    sim, init, _ = setup
    previous = jcal.fit(sim.data, CONFIG, astrometry_model=extra.radial_astrometry(init)).astrometry.model
    model = eqx.tree_at(lambda m: m.visit.inner.coeffs, previous, init.visit.inner.coeffs)  # visits restart
    filt = jm.freeze(jm.parameter_filter(model), lambda m: m.chip)
    result = jcal.fit(sim.data, CONFIG, astrometry_model=model, mapping_filter=filt)
    fitted = result.astrometry.model
    assert np.array_equal(np.asarray(fitted.chip.inner.coeffs), np.asarray(model.chip.inner.coeffs))
    assert not np.allclose(np.asarray(fitted.visit.inner.coeffs), np.asarray(model.visit.inner.coeffs))
    assert result.metrics["astrometry_chi2_per_ndof"] < 1.5
