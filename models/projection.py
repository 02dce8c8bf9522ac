"""Gnomonic (TAN) projection, as in FITS WCS with the default LONPOLE = 180 deg.

(xi, eta) are intermediate world coordinates in degrees: xi grows towards east (increasing
RA), eta towards north, both zero at the tangent point.
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
