"""Model forms: bases, projection, compositions, autodiff, against astropy."""

import jax
import jax.numpy as jnp
import numpy as np
from astropy.wcs import WCS
from numpy.polynomial import legendre

import jcal_models as jm


def test_legendre_basis_matches_numpy():
    u, v = np.linspace(-1, 1, 7), np.linspace(1, -1, 7)
    b = np.asarray(jm.basis_2d(jnp.asarray(u), jnp.asarray(v), 4))
    for k, (i, j) in enumerate(jm.term_powers(4)):
        expect = legendre.legval(u, np.eye(5)[i]) * legendre.legval(v, np.eye(5)[j])
        np.testing.assert_allclose(b[:, k], expect, atol=1e-14)
    assert b.shape == (7, jm.n_terms(4))


def test_gnomonic_matches_astropy_tan_and_round_trips():
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [150.0, 62.0]
    w.wcs.crpix = [1.0, 1.0]  # FITS 1-based: 0-based pixel 0 is the reference pixel
    w.wcs.cdelt = [1.0, 1.0]  # pixel == intermediate world coordinate in degrees
    xi, eta = np.meshgrid(np.linspace(-1.5, 1.5, 9), np.linspace(-1.5, 1.5, 9))
    ra, dec = w.all_pix2world(xi.ravel(), eta.ravel(), 0)
    ra2, dec2 = (np.asarray(a) for a in jm.tangent_to_sky(jnp.asarray(xi.ravel()), jnp.asarray(eta.ravel()), 150.0, 62.0))
    np.testing.assert_allclose(ra2, ra, atol=1e-11)
    np.testing.assert_allclose(dec2, dec, atol=1e-11)
    xi2, eta2 = jm.sky_to_tangent(jnp.asarray(ra), jnp.asarray(dec), 150.0, 62.0)
    np.testing.assert_allclose(np.asarray(xi2), xi.ravel(), atol=1e-11)
    np.testing.assert_allclose(np.asarray(eta2), eta.ravel(), atol=1e-11)


def test_vector_projection_equals_gnomonic():
    """`direction`/`project` (the fit's trigonometry-free form) are the gnomonic projection."""
    rng = np.random.default_rng(3)
    ra0, dec0 = 150.0, 62.0
    xi, eta = rng.uniform(-1.5, 1.5, (2, 50))
    basis = jm.tangent_basis(ra0, dec0)
    back = jm.project(jax.vmap(lambda a, b: jm.direction(a, b, basis))(xi, eta), basis)
    np.testing.assert_allclose(np.asarray(back), [xi, eta], atol=1e-12)
    # a point given by its own tangent plane, projected onto another plane ~1 deg away
    ra1, dec1 = jm.tangent_to_sky(jnp.asarray(xi), jnp.asarray(eta), ra0, dec0)
    other = jm.tangent_basis(150.8, 62.5)
    expected = jm.sky_to_tangent(ra1, dec1, 150.8, 62.5)
    got = jm.project(jax.vmap(lambda a, b: jm.direction(a, b, basis))(xi, eta), other)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-11)


def _constrained(seed=0):
    rng = np.random.default_rng(seed)
    chip = rng.normal(0, 1e-3, (3, 2, 3))
    chip[:, 0, 1] += 0.05
    chip[:, 1, 2] += 0.05
    visit = rng.normal(0, 1e-4, (2, 2, jm.n_terms(3)))
    visit[:, 0, 1] += 1.0
    visit[:, 1, 2] += 1.0
    return jm.constrained_astrometry(chip, np.full((3, 2), 500.0), np.full((3, 2), 512.0), 1,
                                     visit, np.zeros((2, 2)), np.full((2, 2), 0.1), 3,
                                     np.array([10.0, 10.1]), np.array([-30.0, -30.05]), 0)


def test_composition_equals_chain_of_parts_and_chain_operator():
    model = _constrained()
    idx = {"detector": 1, "visit": 0}
    view = jm.gather(model, idx)
    direct = view(300.0, 700.0)
    chained = (view.chip | view.visit | view.sky)(300.0, 700.0)
    np.testing.assert_allclose(np.asarray(direct), np.asarray(chained), rtol=0, atol=1e-12)
    ra, dec = jm.evaluate(model, {"detector": jnp.array([1, 1]), "visit": jnp.array([0, 0])},
                          jnp.array([300.0, 10.0]), jnp.array([700.0, 20.0]))
    np.testing.assert_allclose([ra[0], dec[0]], np.asarray(direct), atol=1e-12)
    # the tangent-plane part: `tangent` then the visit's projection is the model
    np.testing.assert_allclose(np.asarray(view.sky(*view.tangent(300.0, 700.0))), np.asarray(direct), atol=1e-12)
    assert model.compares_in_tangent_plane

    class Overridden(jm.ConstrainedAstrometry):  # its own __call__: `tangent` may not match it
        def __call__(self, x, y):
            return super().__call__(x, y)

    assert not Overridden(model.chip, model.visit, model.sky, 0).compares_in_tangent_plane


def test_gradients_match_finite_differences():
    model = _constrained()
    idx = {"detector": 2, "visit": 1}

    def dec_of(coeffs):
        m = jm.gather(model, idx)
        m = jax.tree_util.tree_map(lambda a: a, m)
        import equinox as eqx
        m = eqx.tree_at(lambda t: t.visit.inner.coeffs, m, coeffs)
        return m(123.0, 456.0)[1]

    c0 = jm.gather(model, idx).visit.inner.coeffs
    g = np.asarray(jax.grad(dec_of)(c0))
    h = 1e-7
    for k in [(0, 0), (1, 0), (1, 2), (1, 5)]:
        e = jnp.zeros_like(c0).at[k].set(h)
        fd = (dec_of(c0 + e) - dec_of(c0 - e)) / (2 * h)
        assert abs(g[k] - float(fd)) < 1e-6 * max(1.0, abs(g[k]))


def test_parameter_filter_excludes_fixed_fields_and_freeze():
    model = _constrained()
    filt = jm.parameter_filter(model)
    assert filt.chip.inner.coeffs is True and filt.chip.inner.center is False
    assert filt.sky.inner.ra0 is False
    frozen = jm.freeze(filt, lambda m: m.chip)
    assert frozen.chip.inner.coeffs is False and frozen.visit.inner.coeffs is True


def test_stars_proper_motion_moves_linearly():
    s = jm.Stars.at(np.array([10.0]), np.array([20.0]), np.array([2020.0]), True)
    s = jax.tree_util.tree_map(lambda a: a, s)
    import equinox as eqx
    s = eqx.tree_at(lambda t: t.pm, s, jnp.array([[10 * jm.MAS, -5 * jm.MAS]]))
    one = jax.tree_util.tree_map(lambda a: a[0], s)
    ra, dec = one.position(2024.0)
    assert abs((float(dec) - 20.0) * 3.6e6 - (-20.0)) < 1e-4  # gnomonic curvature is ~1e-6 mas
    assert abs((float(ra) - 10.0) * np.cos(np.radians(20.0)) * 3.6e6 - 40.0) < 1e-3
