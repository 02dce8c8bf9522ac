"""Extra astrometric model forms built on `ConstrainedAstrometry` (see `core.py` for the contract).

- `RadialAstrometry`: chip polynomial -> radial optical distortion (r^3, r^5 about a fixed optical
  centre, shared by all visits) -> per-visit polynomial -> sky.
- `PixelGridAstrometry`: per-detector bilinear pixel-grid (dx, dy) correction applied BEFORE the
  chip polynomial -> chip polynomial -> visit polynomial -> sky.
- `TurbulentAstrometry`: chip polynomial -> per-visit polynomial PLUS a smooth per-visit field on
  a coarse bilinear grid over the focal plane (atmospheric turbulence-like) -> sky.

Gauges (all of them also keep `ConstrainedAstrometry`'s reference-detector gauge):
- radial: k3 r^3 is exactly representable by a visit polynomial of order >= 3 (r^2 u is cubic),
  k5 by order >= 5: a shift of k into every visit polynomial leaves the model unchanged. So
  `fix_gauge` holds k3 when visit_order >= 3 and k5 when visit_order >= 5.
- grids: bilinear interpolation reproduces every affine function (and u*v) exactly, so a grid's
  affine + bilinear part is degenerate with the chip (resp. visit) polynomial. `fix_gauge` holds
  the 4 corner nodes of every grid at their starting value (zero): a bilinear function that
  vanishes at 4 corners of a rectangle vanishes everywhere, which removes the degeneracy.
"""

from __future__ import annotations

import equinox as eqx
import jax.numpy as jnp
import numpy as np

from .astrometry import ConstrainedAstrometry, TangentPlaneAstrometry
from .core import Grouped, Transform, fixed_field, namespace


def _zero_where(mask, where, index):
    """Set `where(mask)[index] = 0` unless that leaf was partitioned away (None: frozen anyway)."""
    leaf = where(mask)
    if leaf is None:
        return mask
    return eqx.tree_at(where, mask, leaf.at[index].set(0.0))


def _zero_all(mask, where):
    leaf = where(mask)
    return mask if leaf is None else eqx.tree_at(where, mask, jnp.zeros_like(leaf))


def bilinear(values, x, y, lo, hi):
    """Bilinear interpolation of a (ny, nx, 2) node grid spanning [lo, hi] at the point (x, y).

    Points outside the box are extrapolated linearly from the edge cells. `x`, `y` may be
    arrays of points (the result then has their shape + (2,))."""
    xp = namespace(values, x, y)
    ny, nx = values.shape[0], values.shape[1]
    s = (x - lo[0]) / (hi[0] - lo[0]) * (nx - 1)
    t = (y - lo[1]) / (hi[1] - lo[1]) * (ny - 1)
    i = xp.clip(xp.floor(s), 0, nx - 2).astype(int)
    j = xp.clip(xp.floor(t), 0, ny - 2).astype(int)
    fs, ft = (s - i)[..., None], (t - j)[..., None]  # broadcast against the trailing (dx, dy) axis
    v00, v01 = values[j, i], values[j, i + 1]
    v10, v11 = values[j + 1, i], values[j + 1, i + 1]
    return (1 - ft) * ((1 - fs) * v00 + fs * v01) + ft * ((1 - fs) * v10 + fs * v11)


# -- (a) radial -------------------------------------------------------------------------------------
class Radial(Transform):
    """(u, v) -> (u, v) + (k3 rho^2 + k5 rho^4) (u - cu, v - cv), rho = |(u, v) - c| / scale."""

    k: jnp.ndarray  # (2,): k3, k5 (dimensionless)
    center: jnp.ndarray = fixed_field()  # (2,) optical centre, focal-plane units
    scale: jnp.ndarray = fixed_field()  # () normalising radius

    def __call__(self, u, v):
        du, dv = u - self.center[0], v - self.center[1]
        rho2 = (du**2 + dv**2) / self.scale**2
        f = self.k[0] * rho2 + self.k[1] * rho2**2
        return u + f * du, v + f * dv


class RadialAstrometry(TangentPlaneAstrometry):
    """pixels --chip--> focal --radial (global)--> focal' --visit--> tangent plane --> sky."""

    chip: Grouped
    radial: Radial
    visit: Grouped
    sky: Grouped
    reference_detector: int = eqx.field(static=True, default=0)

    def tangent(self, x, y):
        return self.visit(*self.radial(*self.chip(x, y)))

    def sip_order(self) -> int:
        return max(5, self.chip.inner.order * self.visit.inner.order)  # r^5 through the visit map

    def fix_gauge(self, mask):
        mask = _zero_where(mask, lambda m: m.chip.inner.coeffs, self.reference_detector)
        order = self.visit.inner.order
        if order >= 3:
            mask = _zero_where(mask, lambda m: m.radial.k, 0)
        if order >= 5:
            mask = _zero_where(mask, lambda m: m.radial.k, 1)
        return mask

    def first_stage(self, mask):
        mask = _zero_all(mask, lambda m: m.chip.inner.coeffs)
        return _zero_all(mask, lambda m: m.radial.k)


def radial_astrometry(initial: ConstrainedAstrometry, optical_center=None, k=(0.0, 0.0)) -> RadialAstrometry:
    """Start from a first-guess `ConstrainedAstrometry`; optical centre default: focal-plane centre."""
    fc = initial.visit.inner.center[0]
    fh = initial.visit.inner.half_width[0]
    center = jnp.asarray(fc if optical_center is None else optical_center, float)
    return RadialAstrometry(chip=initial.chip, radial=Radial(k=jnp.asarray(k, float), center=center,
                                                              scale=jnp.max(fh)),
                            visit=initial.visit, sky=initial.sky, reference_detector=initial.reference_detector)


# every group's four corner nodes (the grid's bilinear part duplicates the polynomial's)
_CORNERS = (slice(None), np.array([0, 0, -1, -1]), np.array([0, -1, 0, -1]))  # numpy: import runs no JAX


# -- (b) per-chip pixel grid ------------------------------------------------------------------------
class PixelGrid(Transform):
    """(x, y) -> (x, y) + bilinear node offsets [pixels] over the detector box [lo, hi]."""

    offsets: jnp.ndarray  # (ny, nx, 2)
    lo: jnp.ndarray = fixed_field()
    hi: jnp.ndarray = fixed_field()

    def __call__(self, x, y):
        d = bilinear(self.offsets, x, y, self.lo, self.hi)
        return x + d[..., 0], y + d[..., 1]


class PixelGridAstrometry(TangentPlaneAstrometry):
    """pixels --grid per detector--> pixels' --chip--> focal --visit--> tangent plane --> sky."""

    grid: Grouped  # PixelGrid, by "detector"
    chip: Grouped
    visit: Grouped
    sky: Grouped
    reference_detector: int = eqx.field(static=True, default=0)

    def tangent(self, x, y):
        return self.visit(*self.chip(*self.grid(x, y)))

    def fix_gauge(self, mask):
        mask = _zero_where(mask, lambda m: m.chip.inner.coeffs, self.reference_detector)
        return _zero_where(mask, lambda m: m.grid.inner.offsets, _CORNERS)

    def first_stage(self, mask):
        mask = _zero_all(mask, lambda m: m.chip.inner.coeffs)
        return _zero_all(mask, lambda m: m.grid.inner.offsets)


def pixel_grid_astrometry(initial: ConstrainedAstrometry, nodes: int = 4) -> PixelGridAstrometry:
    c, h = initial.chip.inner.center, initial.chip.inner.half_width  # (n_det, 2)
    n_det = c.shape[0]
    grid = PixelGrid(offsets=jnp.zeros((n_det, nodes, nodes, 2)), lo=c - h, hi=c + h)
    return PixelGridAstrometry(grid=Grouped(grid, by="detector"), chip=initial.chip, visit=initial.visit,
                               sky=initial.sky, reference_detector=initial.reference_detector)


# -- (c) per-visit turbulence-like field --------------------------------------------------------------
class TurbulentVisit(Transform):
    """(u, v) -> polynomial(u, v) + bilinear node field(u, v) [tangent-plane degrees]."""

    poly: Transform  # Polynomial
    field: jnp.ndarray  # (ny, nx, 2)
    lo: jnp.ndarray = fixed_field()
    hi: jnp.ndarray = fixed_field()

    def __call__(self, u, v):
        xi, eta = self.poly(u, v)
        d = bilinear(self.field, u, v, self.lo, self.hi)
        return xi + d[..., 0], eta + d[..., 1]


class TurbulentAstrometry(TangentPlaneAstrometry):
    """pixels --chip--> focal --(visit polynomial + visit grid field)--> tangent plane --> sky."""

    chip: Grouped
    visit: Grouped  # TurbulentVisit, by "visit"
    sky: Grouped
    reference_detector: int = eqx.field(static=True, default=0)

    def tangent(self, x, y):
        return self.visit(*self.chip(x, y))

    def fix_gauge(self, mask):
        mask = _zero_where(mask, lambda m: m.chip.inner.coeffs, self.reference_detector)
        return _zero_where(mask, lambda m: m.visit.inner.field, _CORNERS)

    def first_stage(self, mask):
        mask = _zero_all(mask, lambda m: m.chip.inner.coeffs)
        return _zero_all(mask, lambda m: m.visit.inner.field)


def turbulent_astrometry(initial: ConstrainedAstrometry, nodes: int = 3) -> TurbulentAstrometry:
    """`nodes` x `nodes` grid per visit. Every free node needs measurements in its cells in every
    visit, else the normal equations are singular: 3 suits tiny surveys (a visit missing a
    detector), 5+ needs full focal-plane coverage."""
    p = initial.visit.inner
    n_vis = p.center.shape[0]
    inner = TurbulentVisit(poly=p, field=jnp.zeros((n_vis, nodes, nodes, 2)),
                           lo=p.center - p.half_width, hi=p.center + p.half_width)
    return TurbulentAstrometry(chip=initial.chip, visit=Grouped(inner, by="visit"), sky=initial.sky,
                               reference_detector=initial.reference_detector)
