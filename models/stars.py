"""Fitted stars: a position per star, plus an optional proper motion.

Each star's position is parametrised by a small offset (xi, eta) [deg] in the plane tangent
at its starting position (ra0, dec0), so parameters stay O(arcsec) and well-scaled; the
proper motion (deg/yr, in the same plane) moves the star linearly from `epoch0`.
"""

from __future__ import annotations

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float

from .core import fixed_field, namespace
from .registry import register
from .projection import direction, tangent_basis, tangent_to_sky

MAS = 1.0 / 3.6e6  # degrees per milliarcsecond


@register
class Stars(eqx.Module):
    """Every array has a leading star axis; the solver gathers one star per measurement."""

    offset: Float[Array, "stars 2"]  # deg, in the tangent plane at (ra0, dec0)
    pm: Float[Array, "stars 2"] | None  # deg/yr, None: no proper motions at all
    ra0: Float[Array, "stars"] = fixed_field()
    dec0: Float[Array, "stars"] = fixed_field()
    epoch0: Float[Array, "stars"] = fixed_field()

    @classmethod
    def at(cls, ra, dec, epoch0, proper_motion: bool) -> "Stars":
        ra, dec, epoch0 = (jnp.asarray(a, dtype=jnp.float64) for a in (ra, dec, epoch0))
        zeros = jnp.zeros((ra.shape[0], 2))
        return cls(offset=zeros, pm=zeros if proper_motion else None, ra0=ra, dec0=dec,
                   epoch0=jnp.broadcast_to(epoch0, ra.shape))

    def offset_at(self, epoch):
        """(xi, eta) [deg] of ONE star (a gathered view) at `epoch` [yr], in its tangent plane."""
        xi, eta = self.offset[0], self.offset[1]
        if self.pm is not None:
            dt = epoch - self.epoch0
            xi, eta = xi + self.pm[0] * dt, eta + self.pm[1] * dt
        return xi, eta

    def position(self, epoch):
        """(ra, dec) [deg] of ONE star (a gathered view) at `epoch` [yr]."""
        return tangent_to_sky(*self.offset_at(epoch), self.ra0, self.dec0, xp=namespace(self.offset, self.ra0))

    def direction(self, epoch):
        """A direction (3-vector, not normalised) towards ONE star at `epoch` [yr]: `position`
        without trigonometry in the fitted parameters (see `projection`)."""
        return direction(*self.offset_at(epoch), tangent_basis(self.ra0, self.dec0))

    @property
    def n_stars(self) -> int:
        return self.ra0.shape[0]
