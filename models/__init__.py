"""jcal_models: jcal's model forms, pure JAX, one point at a time.

Read `core.py` first: it states the contract a model form meets (single-point `__call__`,
per-group parameters inside `Grouped`, fixed data in `fixed_field`s) and why.
"""

import jax

jax.config.update("jax_enable_x64", True)  # sky positions need float64

from .astrometry import (  # noqa: E402
    ConstrainedAstrometry,
    SimpleAstrometry,
    TangentPlaneAstrometry,
    TangentPlaneToSky,
    constrained_astrometry,
    simple_astrometry,
)
from .basis import basis_2d, n_terms, term_powers  # noqa: E402
from .core import (  # noqa: E402
    GLOBAL,
    Chain,
    Grouped,
    Transform,
    fixed_field,
    evaluate,
    freeze,
    gather,
    group_keys,
    n_parameters,
    parameter_filter,
)
from .polynomial import Polynomial  # noqa: E402
from .projection import direction, project, sky_to_tangent, tangent_basis, tangent_to_sky  # noqa: E402
from .stars import MAS, Stars  # noqa: E402
from .photometry import (  # noqa: E402
    ChebyshevField,
    ColourTerms,
    Constant,
    ConstrainedFlux,
    ConstrainedMagnitude,
    DetectorField,
    PhotometricStars,
    PhotometricTransform,
    SimpleFlux,
    SimpleMagnitude,
    WithColourTerms,
    base_form,
    colour_terms,
    constrained_flux,
    constrained_magnitude,
    detector_field,
    freeze_colour_slope,
    simple_flux,
    simple_magnitude,
)
from . import extra  # noqa: E402  (more forms: radial term, pixel grid, turbulence field)
