"""Photometric model forms: pixel (x, y) -> calibration, one point at a time.

Every form is of one of two kinds (the class attribute `kind`):

- ``"flux"``: ``form(x, y)`` is the calibration c(x, y) [nJy per count]; a measurement's
  calibrated flux is ``instFlux * c``;
- ``"magnitude"``: ``form(x, y)`` is the zero point z(x, y) [AB mag of one count]; a
  measurement's calibrated magnitude is ``-2.5 log10(instFlux) + z``, and
  ``c = 10**(-0.4 (z - 31.4))`` (LSST's ``zeroPoint = 31.4 - 2.5 log10(calibrationMean)``).

`calibration(x, y)` gives c for either kind, `zero_point(x, y)` gives z.

Forms (jointcal's four photometry models):

- `SimpleFlux` / `SimpleMagnitude`: one constant per detector-visit (`Grouped` by
  ``"ccd_visit"``). Nothing is degenerate.
- `ConstrainedFlux` / `ConstrainedMagnitude`: a constant per detector (`Grouped` by
  ``"band_detector"``: a detector's response differs between bands, so it gets one constant
  per band it was observed in; with a single band this is one per detector) combined - a
  product for flux, a sum for magnitude - with a per-visit Chebyshev field of total order
  ``order`` over the focal plane (`Grouped` by ``"visit"``). The focal-plane position comes
  from a fixed pixel -> focal-plane map per detector (`Grouped` by ``"detector"``, declared
  with `fixed_field`: typically the chip part of the fitted astrometric model). The
  composition is degenerate (a factor can move between all detectors of a band and all
  visits of that band); the gauge is fixed by holding ONE reference detector constant per
  band at its starting value (`fix_gauge`), 1 for flux, 0 for magnitude.

`PhotometricStars` holds the fitted flux (nJy) or magnitude (AB) of every star in every band.

Colour terms (`ColourTerms`, `WithColourTerms`): the instrument band b differs from the
reference catalog's band by a polynomial in a reference colour (jointcal / LSST ``Colorterm``),
``mag_instrument = mag_ref(primary) + c0_b + c1_b colour + c2_b colour**2`` with
``colour = mag_ref(primary) - mag_ref(secondary)``. `WithColourTerms(base, colour)` is the
photometric form `base` (its `__call__`, `kind`, gauge unchanged) carrying the per-band
coefficients as GLOBAL (ungrouped) parameters, so the solver can fit ``c1`` jointly with the
calibration; ``c0`` and ``c2`` are data (``c0`` is degenerate with the zero points).
"""

import abc
from typing import Any, ClassVar

import equinox as eqx
from equinox import AbstractClassVar
import jax.numpy as jnp
from jaxtyping import Array, Float

from .basis import basis_2d, n_terms
from .core import AbstractForm, Grouped, fixed_field, namespace
from .registry import register

AB_ZERO_POINT_NJY = 31.4  # AB magnitude of 1 nJy
KINDS = ("flux", "magnitude")


@register
class Constant(eqx.Module):
    """A value that does not depend on the position (one per group inside `Grouped`)."""

    value: Float[Array, ""]

    def __call__(self, x, y):
        return self.value


@register
class ChebyshevField(eqx.Module):
    """sum_k a_k T_i(u) T_j(v) over total degree <= order; u = (x - cx) / hx, v = (y - cy) / hy."""

    coeffs: Float[Array, "terms"]
    center: Float[Array, "2"] = fixed_field()
    half_width: Float[Array, "2"] = fixed_field()
    order: int = fixed_field(static=True)

    def basis(self, x, y):
        u = (x - self.center[0]) / self.half_width[0]
        v = (y - self.center[1]) / self.half_width[1]
        return basis_2d(u, v, self.order, "chebyshev", xp=namespace(u, v, self.coeffs))

    def __call__(self, x, y):
        return self.basis(x, y) @ self.coeffs


@register
class DetectorField(ChebyshevField):
    """As `ChebyshevField` over 1 <= i + j <= order: a field over one detector's pixels without its
    constant (that is the detector's `Constant`); `coeffs` has n_terms(order) - 1 entries."""

    def __call__(self, x, y):
        return self.basis(x, y)[1:] @ self.coeffs


class PhotometricTransform(AbstractForm):
    """Base of photometric forms: `__call__(x, y)` gives c (flux kind) or z (magnitude kind).

    A form declares its `kind` ("flux" or "magnitude") as a class attribute (or a property)."""

    kind: AbstractClassVar[str]

    @abc.abstractmethod
    def __call__(self, x, y):
        """c [nJy/count] (flux kind) or z [AB mag of one count] (magnitude kind) at one pixel."""

    def calibration(self, x, y):
        """nJy per count at one pixel (a gathered view)."""
        return to_calibration(self(x, y), self.kind)

    def zero_point(self, x, y):
        """AB magnitude of one count at one pixel."""
        return to_zero_point(self(x, y), self.kind)


def to_calibration(value, kind: str):
    """nJy per count from a form's value of `kind`."""
    return value if kind == "flux" else 10.0 ** (-0.4 * (value - AB_ZERO_POINT_NJY))


def to_zero_point(value, kind: str):
    """AB magnitude of one count from a form's value of `kind`."""
    return value if kind == "magnitude" else AB_ZERO_POINT_NJY - 2.5 * namespace(value).log10(value)


class SimpleFlux(PhotometricTransform):
    """c(x, y) = s_k for detector-visit k."""

    kind: ClassVar[str] = "flux"
    ccd_visit: Grouped  # Constant, by "ccd_visit"

    def __call__(self, x, y):
        return self.ccd_visit(x, y)


class SimpleMagnitude(PhotometricTransform):
    """z(x, y) = z_k for detector-visit k."""

    kind: ClassVar[str] = "magnitude"
    ccd_visit: Grouped  # Constant, by "ccd_visit"

    def __call__(self, x, y):
        return self.ccd_visit(x, y)


class _Constrained(PhotometricTransform):
    focal: Grouped = fixed_field()  # pixel -> focal plane (2 outputs), by "detector"; not fitted
    detector: Grouped  # Constant, by "band_detector"
    visit: Grouped  # ChebyshevField, by "visit"
    reference_detectors: tuple[int, ...] = eqx.field(static=True, default=(0,))  # held (gauge), one per band
    # optional DetectorField by "band_detector": each detector's own spatial terms (e.g. a gradient)
    detector_field: Grouped | None = None

    def fix_gauge(self, mask):
        """Hold the reference detector constants (one per band), and their own fields: removes the
        detector/visit degeneracies (a visit field's constant and, with detector fields, its linear
        terms could otherwise move into every detector of the band).

        `mask` is a 0/1 pytree shaped like the fitted parameters; returns it updated.
        """
        refs = jnp.asarray(self.reference_detectors, dtype=jnp.int32)
        value = mask.detector.inner.value
        mask = eqx.tree_at(lambda m: m.detector.inner.value, mask, value.at[refs].set(0.0))
        if self.detector_field is not None and mask.detector_field is not None:
            coeffs = mask.detector_field.inner.coeffs
            mask = eqx.tree_at(lambda m: m.detector_field.inner.coeffs, mask, coeffs.at[refs].set(0.0))
        return mask

    def first_stage(self, mask):
        """The first fitting stage frees only the visit fields (jointcal's "ModelVisit")."""
        value = mask.detector.inner.value
        mask = eqx.tree_at(lambda m: m.detector.inner.value, mask, jnp.zeros_like(value))
        if self.detector_field is not None and mask.detector_field is not None:
            coeffs = mask.detector_field.inner.coeffs
            mask = eqx.tree_at(lambda m: m.detector_field.inner.coeffs, mask, jnp.zeros_like(coeffs))
        return mask

    def detector_term(self, x, y):
        """The detector's own field at the pixel (0 without detector fields)."""
        return 0.0 if self.detector_field is None else self.detector_field(x, y)

    def focal_position(self, x, y):
        return self.focal(x, y)


class ConstrainedFlux(_Constrained):
    """c(x, y) = s_d * F_v(focal_d(x, y)): detector scale times visit field."""

    kind: ClassVar[str] = "flux"

    def __call__(self, x, y):
        fx, fy = self.focal(x, y)
        return self.detector(x, y) * (1.0 + self.detector_term(x, y)) * self.visit(fx, fy)


class ConstrainedMagnitude(_Constrained):
    """z(x, y) = z_d + Z_v(focal_d(x, y)): detector offset plus visit field (magnitudes)."""

    kind: ClassVar[str] = "magnitude"

    def __call__(self, x, y):
        fx, fy = self.focal(x, y)
        return self.detector(x, y) + self.detector_term(x, y) + self.visit(fx, fy)


@register
class PhotometricStars(eqx.Module):
    """Fitted flux [nJy] (kind "flux") or AB magnitude (kind "magnitude") of every star in every band.

    `value` has a leading star axis; the solver gathers one star per measurement, whose
    residual picks its band: ``star.value[band]``.
    """

    value: Float[Array, "stars bands"]
    kind: str = eqx.field(static=True, default="flux")

    @property
    def n_stars(self) -> int:
        return self.value.shape[0]

    def flux(self):
        """nJy, whatever the kind (on the full, ungathered module too)."""
        return to_calibration(self.value, self.kind)

    def magnitude(self):
        return to_zero_point(self.value, self.kind)


@register
class ColourTerms(eqx.Module):
    """Per fitted band b: delta_b(colour) = c0_b + c1_b colour + c2_b colour**2 [mag], the
    instrument-minus-reference magnitude of a star whose reference colour (primary - secondary,
    both reference catalog bands) is `colour`. Bands without a colour term have empty names and
    zero coefficients. Not `Grouped`: every measurement sees every band's coefficients (GLOBAL)."""

    slope: Float[Array, "bands"]  # c1: fitted when `fitted[b]`
    offset: Float[Array, "bands"] = fixed_field()  # c0: never fitted (degenerate with the zero points)
    curvature: Float[Array, "bands"] = fixed_field()  # c2
    primary: tuple[str, ...] = eqx.field(static=True, default=())  # reference band per fitted band ("" none)
    secondary: tuple[str, ...] = eqx.field(static=True, default=())
    fitted: tuple[bool, ...] = eqx.field(static=True, default=())  # c1 free in the fit

    def __call__(self, band, colour):
        """delta [mag] for band index `band` (a scalar) at reference colour `colour`."""
        return self.offset[band] + self.slope[band] * colour + self.curvature[band] * colour**2

    @property
    def active(self) -> tuple[bool, ...]:
        """Per band: has a colour term (a primary and secondary reference band)."""
        return tuple(bool(p) for p in self.primary)


class WithColourTerms(PhotometricTransform):
    """A photometric form `base` plus per-band colour terms; evaluates exactly as `base`.

    The colour term does not change the calibration of a measurement: it relates the
    reference catalog to the instrument band, so the photometric fit applies it where
    reference fluxes meet fitted stars (see `jcal.calibration.photometry`)."""

    base: PhotometricTransform
    colour: ColourTerms

    @property
    def kind(self) -> str:  # type: ignore[override]
        return self.base.kind

    def __call__(self, x, y):
        return self.base(x, y)

    def fix_gauge(self, mask):
        """The base form's gauge, and c1 held for bands whose colour term is not fitted."""
        mask = eqx.tree_at(lambda m: m.base, mask, self.base.fix_gauge(mask.base))
        if mask.colour.slope is None:  # c1 not a parameter at all (mapping filter)
            return mask
        free = jnp.asarray(self.colour.fitted, dtype=mask.colour.slope.dtype)
        return eqx.tree_at(lambda m: m.colour.slope, mask, mask.colour.slope * free)

    def hold_colour(self, mask):
        """`mask` with every colour coefficient held (stages where the stars are not fitted)."""
        if mask.colour.slope is None:
            return mask
        return eqx.tree_at(lambda m: m.colour.slope, mask, jnp.zeros_like(mask.colour.slope))

    def stars_held(self, mask):
        """Colour terms move only with the stars (`hold_colour`)."""
        return self.hold_colour(mask)

    def first_stage(self, mask):
        """The base form's first-stage mask with the colour terms held, or None (no first stage)."""
        base_first = self.base.first_stage(mask.base)
        if base_first is None:
            return None
        return self.hold_colour(eqx.tree_at(lambda m: m.base, mask, base_first))


def colour_terms(primary, secondary, c0, c1, c2, fitted) -> ColourTerms:
    """Per-band colour terms; the sequences are aligned with the fit's bands ("" = no term)."""
    as_array = lambda v: jnp.asarray(v, dtype=jnp.float64)  # noqa: E731
    return ColourTerms(slope=as_array(c1), offset=as_array(c0), curvature=as_array(c2),
                       primary=tuple(str(p) for p in primary), secondary=tuple(str(s) for s in secondary),
                       fitted=tuple(bool(f) for f in fitted))


def freeze_colour_slope(filter_tree: Any) -> Any:
    """A parameter filter of a `WithColourTerms` model with c1 not fitted (fixed coefficients)."""
    return eqx.tree_at(lambda f: f.colour.slope, filter_tree, False)


def base_form(model: PhotometricTransform) -> PhotometricTransform:
    """The photometric form without its colour terms (the model itself when it has none)."""
    return model.base if isinstance(model, WithColourTerms) else model


# -- constructors ----------------------------------------------------------------------------


def _constants(values, by: str) -> Grouped:
    return Grouped(Constant(value=jnp.asarray(values, dtype=jnp.float64)), by=by)


def simple_flux(calibrations: Float[Array, "ccd_visits"]) -> SimpleFlux:
    """One calibration [nJy/count] per detector-visit."""
    return SimpleFlux(ccd_visit=_constants(calibrations, "ccd_visit"))


def simple_magnitude(zero_points: Float[Array, "ccd_visits"]) -> SimpleMagnitude:
    """One zero point [AB mag of 1 count] per detector-visit."""
    return SimpleMagnitude(ccd_visit=_constants(zero_points, "ccd_visit"))


def detector_field(n_band_detectors: int, center, half_width, order: int) -> Grouped | None:
    """Zero `DetectorField`s of `order` (None for order 0), one per band-detector; `center`,
    `half_width` (band_detectors, 2) normalise each detector's pixels to [-1, 1]^2."""
    if order == 0:
        return None
    return Grouped(DetectorField(coeffs=jnp.zeros((n_band_detectors, n_terms(order) - 1)),
                                 center=jnp.asarray(center, dtype=jnp.float64),
                                 half_width=jnp.asarray(half_width, dtype=jnp.float64), order=order),
                   by="band_detector")


def _constrained(cls, focal: Grouped, detector_values, visit_coeffs, focal_center, focal_half_width,
                 order: int, reference_detectors, detector_fields: Grouped | None = None):
    if focal.by != "detector":
        raise ValueError(f"the focal-plane map must be grouped by 'detector', not {focal.by!r}")
    visit = Grouped(ChebyshevField(coeffs=jnp.asarray(visit_coeffs, dtype=jnp.float64),
                                   center=jnp.asarray(focal_center, dtype=jnp.float64),
                                   half_width=jnp.asarray(focal_half_width, dtype=jnp.float64), order=order),
                    by="visit")
    return cls(focal=focal, detector=_constants(detector_values, "band_detector"), visit=visit,
               reference_detectors=tuple(int(r) for r in reference_detectors), detector_field=detector_fields)


def constrained_flux(focal: Grouped, detector_scales, visit_coeffs, focal_center, focal_half_width, order: int,
                     reference_detectors=(0,), detector_fields: Grouped | None = None) -> ConstrainedFlux:
    """`focal`: pixel -> focal plane, Grouped by "detector"; `detector_scales` (band_detectors,);
    `visit_coeffs` (visits, n_terms(order)) Chebyshev coefficients in nJy/count; `focal_center`,
    `focal_half_width` (visits, 2) normalise the focal plane to [-1, 1]^2; `detector_fields` (from
    `detector_field`): optional relative spatial terms of each detector (c = s_d (1 + g_d) F_v)."""
    return _constrained(ConstrainedFlux, focal, detector_scales, visit_coeffs, focal_center, focal_half_width,
                        order, reference_detectors, detector_fields)


def constrained_magnitude(focal: Grouped, detector_offsets, visit_coeffs, focal_center, focal_half_width,
                          order: int, reference_detectors=(0,),
                          detector_fields: Grouped | None = None) -> ConstrainedMagnitude:
    """As `constrained_flux`, in magnitudes: detector offsets (+ their fields) and visit fields add up
    to the zero point."""
    return _constrained(ConstrainedMagnitude, focal, detector_offsets, visit_coeffs, focal_center,
                        focal_half_width, order, reference_detectors, detector_fields)
