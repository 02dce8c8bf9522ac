"""Host helpers: distinct integer rows, angular separations, compile options of brief programs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jcal.arrays import unique_rows
from jcal.sky import angle, unit_vectors
from jcal.solver import compile as compile_options


@pytest.mark.parametrize("rows", [
    np.random.default_rng(0).integers(0, 50, (10_000, 2)),  # dense small ids: coded directly
    np.random.default_rng(1).integers(-5, 3, (1_000, 3)),  # negative ids: ranked first
    np.stack([np.random.default_rng(2).integers(0, 2**40, 5_000), np.arange(5_000) % 7], 1),  # LSST-size ids
    np.random.default_rng(3).integers(0, 2**62, (100, 3)),  # too many combinations: numpy's own path
    np.zeros((0, 2), np.int64),
])
def test_unique_rows_matches_numpy(rows):
    first, inverse = unique_rows(rows)
    _, first_np, inverse_np = np.unique(rows, axis=0, return_index=True, return_inverse=True)
    np.testing.assert_array_equal(first, first_np)
    np.testing.assert_array_equal(inverse, inverse_np.ravel())


def test_angle_small_and_large_separations():
    a = unit_vectors(np.array([10.0, 10.0, 0.0, 5.0]), np.array([20.0, 20.0, 0.0, -30.0]))
    b = unit_vectors(np.array([10.0 + 1e-9, 190.0, 0.0, 5.0]), np.array([20.0, -20.0, 90.0, -30.0]))
    expected = np.radians([1e-9 * np.cos(np.radians(20.0)), 180.0, 90.0, 0.0])
    np.testing.assert_allclose(angle(a, b), expected, rtol=1e-6, atol=1e-15)


def test_brief_programs_compute_what_jit_computes(monkeypatch):
    f = lambda x: jnp.sin(x) @ x.T + jnp.cumsum(x, axis=0)  # noqa: E731
    x = jax.random.normal(jax.random.key(0), (30, 30))
    np.testing.assert_allclose(compile_options.brief_jit(f)(x), jax.jit(f)(x), rtol=1e-13)
    assert compile_options._compiler_options() in ({}, compile_options._OLDER_EMITTERS)
    # an XLA that does not know the option: XLA's defaults, no error
    monkeypatch.setattr(compile_options, "_OLDER_EMITTERS", {"xla_cpu_no_such_option": False})
    compile_options._compiler_options.cache_clear()
    try:
        assert compile_options._compiler_options() == {}
        np.testing.assert_allclose(compile_options.brief_jit(f)(x), jax.jit(f)(x), rtol=1e-13)
    finally:
        compile_options._compiler_options.cache_clear()


def test_tile_classes_fewest_that_pad_little():
    from jcal.solver.layout import Tiles, choose_tile_classes, fill_flops
    rng = np.random.default_rng(0)
    n_stars, per_star = 4096, 4
    star = np.repeat(np.arange(n_stars), per_star)
    ra = rng.uniform(0, 1, n_stars)
    xyz = unit_vectors(ra, rng.uniform(0, 1, n_stars))
    uniform = np.stack([star % 3, np.tile(np.arange(per_star), n_stars)], 1)  # every tile: same groups
    tiles = Tiles.of(star, xyz, uniform, 64)
    assert len(choose_tile_classes(tiles, (6, 20), 4)) == 2  # nothing to gain from more classes
    spread = np.stack([star % 3, rng.integers(0, 1 + (ra[star] * 40).astype(int))], 1)  # tiles see 1..40 groups
    tiles = Tiles.of(star, xyz, spread, 64)
    eight = tiles.split((6, 20), 8)
    chosen = choose_tile_classes(tiles, (6, 20), 4, extra_flops=0.0)
    assert len(chosen) == len(eight)  # no padding allowed: the finest split
    assert fill_flops(tiles.split((6, 20), 2), (6, 20), 4) > fill_flops(eight, (6, 20), 4)
