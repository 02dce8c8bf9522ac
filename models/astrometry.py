"""Astrometric model forms: pixel (x, y) -> sky (ra, dec) [deg], one point at a time.

- `simple_astrometry`: one polynomial per detector-visit, pixels -> visit tangent plane.
- `constrained_astrometry`: per-detector polynomial (pixels -> focal plane) composed with a
  per-visit polynomial (focal plane -> visit tangent plane). The composition is degenerate
  (an invertible map of the focal plane can move between the two); jcal fixes the gauge by
  holding ONE reference detector's polynomial at its starting value (`gauge_groups`), which
  pins the focal-plane frame for every visit that sees that detector - and through the
  shared detectors, for all.
Both end with the inverse gnomonic projection about each visit's tangent point: they are
`TangentPlaneAstrometry` forms, which define `tangent` (pixels -> that plane) and get
`__call__` (-> sky) from it.
"""

import abc

import equinox as eqx
from equinox import AbstractVar
import jax.numpy as jnp
from jaxtyping import Array, Float

from .core import Grouped, Transform, fixed_field, namespace
from .polynomial import Polynomial
from .projection import project, tangent_basis, tangent_to_sky


class TangentPlaneToSky(Transform):
    """Inverse gnomonic projection about a fixed tangent point."""

    ra0: Float[Array, ""] = fixed_field()
    dec0: Float[Array, ""] = fixed_field()

    def __call__(self, xi, eta):
        return tangent_to_sky(xi, eta, self.ra0, self.dec0, xp=namespace(xi, eta, self.ra0, self.dec0))

    def project(self, w):
        """(xi, eta) [deg] in this plane of the direction `w` (see `projection`)."""
        return project(w, tangent_basis(self.ra0, self.dec0))


class TangentPlaneAstrometry(Transform):
    """pixels --`tangent`--> the visit's tangent plane [deg] --`sky`--> (ra, dec).

    A form defines `tangent` and a `sky` field (`TangentPlaneToSky` grouped by visit), and
    keeps this `__call__`. The fit then compares each measurement with its star in that plane
    (`project`): no trigonometry to differentiate, ~3x cheaper linearisations than through
    (ra, dec). A subclass that overrides `__call__` is fitted through (ra, dec) instead.
    """

    sky: AbstractVar[Grouped]  # TangentPlaneToSky, by "visit": every subclass declares it

    def __check_init__(self):
        sky = self.sky
        if not (isinstance(sky, Grouped) and sky.by == "visit" and isinstance(sky.inner, TangentPlaneToSky)):
            raise ValueError(f"{type(self).__name__}.sky must be Grouped(TangentPlaneToSky(...), by='visit'), "
                             f"got {type(sky).__name__}")

    @abc.abstractmethod
    def tangent(self, x, y):
        """pixels (x, y) -> (xi, eta) [deg] in the visit's tangent plane."""

    def __call__(self, x, y):
        return self.sky(*self.tangent(x, y))

    def project(self, w):
        """(xi, eta) [deg] in the visit's tangent plane of the direction `w` (one gathered view)."""
        return self.sky.inner.project(w)

    @property
    def compares_in_tangent_plane(self) -> bool:
        return type(self).__call__ is TangentPlaneAstrometry.__call__


def _grouped_polynomial(coeffs, center, half_width, order: int, by: str) -> Grouped:
    return Grouped(Polynomial(coeffs=jnp.asarray(coeffs), center=jnp.asarray(center),
                              half_width=jnp.asarray(half_width), order=order), by=by)


def _sky(tangent_ra, tangent_dec) -> Grouped:
    return Grouped(TangentPlaneToSky(ra0=jnp.asarray(tangent_ra), dec0=jnp.asarray(tangent_dec)), by="visit")


class SimpleAstrometry(TangentPlaneAstrometry):
    """pixels --[polynomial per detector-visit]--> visit tangent plane --> sky."""

    ccd_visit: Grouped  # Polynomial, by "ccd_visit"
    sky: Grouped  # TangentPlaneToSky, by "visit"

    def tangent(self, x, y):
        return self.ccd_visit(x, y)

    # `fix_gauge` keeps the default: nothing is degenerate, every polynomial is pinned by its own stars.

    def sip_order(self) -> int:
        return max(2, self.ccd_visit.inner.order)


def simple_astrometry(coeffs: Float[Array, "ccd_visits 2 terms"], pixel_center, pixel_half_width,
                      order: int, tangent_ra, tangent_dec) -> SimpleAstrometry:
    return SimpleAstrometry(
        ccd_visit=_grouped_polynomial(coeffs, pixel_center, pixel_half_width, order, "ccd_visit"),
        sky=_sky(tangent_ra, tangent_dec),
    )


class ConstrainedAstrometry(TangentPlaneAstrometry):
    """pixels --[chip poly per detector]--> focal plane --[poly per visit]--> tangent plane --> sky."""

    chip: Grouped  # Polynomial, by "detector"
    visit: Grouped  # Polynomial, by "visit"
    sky: Grouped  # TangentPlaneToSky, by "visit"
    reference_detector: int = eqx.field(static=True, default=0)  # index held fixed (gauge)

    def tangent(self, x, y):
        return self.visit(*self.chip(x, y))

    def fix_gauge(self, mask):
        """Hold the reference detector's polynomial: removes the chip/visit degeneracy.

        `mask` is a 0/1 pytree shaped like the fitted parameters; returns it updated.
        """
        coeffs = mask.chip.inner.coeffs
        return eqx.tree_at(lambda m: m.chip.inner.coeffs, mask, coeffs.at[self.reference_detector].set(0.0))

    def sip_order(self) -> int:
        return max(2, self.chip.inner.order * self.visit.inner.order)


def constrained_astrometry(chip_coeffs, chip_center, chip_half_width, chip_order: int,
                           visit_coeffs, focal_center, focal_half_width, visit_order: int,
                           tangent_ra, tangent_dec, reference_detector: int) -> ConstrainedAstrometry:
    return ConstrainedAstrometry(
        chip=_grouped_polynomial(chip_coeffs, chip_center, chip_half_width, chip_order, "detector"),
        visit=_grouped_polynomial(visit_coeffs, focal_center, focal_half_width, visit_order, "visit"),
        sky=_sky(tangent_ra, tangent_dec),
        reference_detector=reference_detector,
    )
