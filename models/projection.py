"""Gnomonic (TAN) projection, as in FITS WCS with the default LONPOLE = 180 deg.

(xi, eta) are intermediate world coordinates in degrees: xi grows towards east (increasing
RA), eta towards north, both zero at the tangent point.

In vector form a tangent plane is its `tangent_basis` (centre, east, north unit vectors): the
point (xi, eta) is the direction c + xi e + eta n (radians), and a direction w projects to
(w.e / w.c, w.n / w.c). The fit compares stars and measurements this way (`direction`,
`project`): rational in the fitted parameters, with no trigonometry to differentiate.
"""

from __future__ import annotations

import jax.numpy as jnp

DEG = jnp.pi / 180.0


def sky_to_tangent(ra, dec, ra0, dec0, xp=jnp):
    """Project (ra, dec) [deg] onto the plane tangent at (ra0, dec0); returns (xi, eta) [deg].

    `xp` is the array namespace: jax.numpy in models, numpy for host-side set-up."""
    a, d, a0, d0 = ra * DEG, dec * DEG, ra0 * DEG, dec0 * DEG
    cos_d, sin_d, cos_d0, sin_d0 = xp.cos(d), xp.sin(d), xp.cos(d0), xp.sin(d0)
    cos_da = xp.cos(a - a0)
    denom = sin_d * sin_d0 + cos_d * cos_d0 * cos_da
    xi = cos_d * xp.sin(a - a0) / denom
    eta = (sin_d * cos_d0 - cos_d * sin_d0 * cos_da) / denom
    return xi / DEG, eta / DEG


def tangent_to_sky(xi, eta, ra0, dec0, xp=jnp):
    """Inverse of `sky_to_tangent`: (xi, eta) [deg] about (ra0, dec0) -> (ra, dec) [deg]."""
    x, y, a0, d0 = xi * DEG, eta * DEG, ra0 * DEG, dec0 * DEG
    cos_d0, sin_d0 = xp.cos(d0), xp.sin(d0)
    denom = cos_d0 - y * sin_d0
    ra = a0 + xp.arctan2(x, denom)
    dec = xp.arctan2(sin_d0 + y * cos_d0, xp.hypot(x, denom))
    return xp.mod(ra / DEG, 360.0), dec / DEG


def tangent_basis(ra0, dec0, xp=jnp):
    """(centre, east, north): unit 3-vectors of the plane tangent at (ra0, dec0) [deg]."""
    a0, d0 = ra0 * DEG, dec0 * DEG
    cos_a, sin_a, cos_d, sin_d = xp.cos(a0), xp.sin(a0), xp.cos(d0), xp.sin(d0)
    centre = xp.stack([cos_d * cos_a, cos_d * sin_a, sin_d], axis=-1)
    east = xp.stack([-sin_a, cos_a, xp.zeros_like(a0)], axis=-1)
    north = xp.stack([-sin_d * cos_a, -sin_d * sin_a, cos_d], axis=-1)
    return centre, east, north


def direction(xi, eta, basis):
    """A direction (not normalised) towards the point (xi, eta) [deg] of the plane `basis`."""
    centre, east, north = basis
    return centre + (xi * DEG) * east + (eta * DEG) * north


def project(w, basis):
    """(xi, eta) [deg]: direction `w` (any length) projected onto the plane `basis`."""
    centre, east, north = basis
    depth = w @ centre
    return (w @ east) / depth / DEG, (w @ north) / depth / DEG
