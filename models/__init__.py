"""jcal_models: jcal's model forms, pure JAX, one point at a time.

Read `core.py` first: it states the contract a model form meets (single-point `__call__`,
per-group parameters inside `Grouped`, fixed data in `fixed_field`s) and why; docs/model_forms.md
says how to write, register and save a new form. Importing this package changes no JAX setting:
forms hold float64 arrays only when 64-bit mode is on (`jcal.configure()`).
"""

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
    AbstractForm,
    Chain,
    Grouped,
    Transform,
    fixed_field,
    evaluate,
    freeze,
    gather,
    group_keys,
    n_parameters,
    namespace,
    parameter_filter,
)
from .registry import ModelFileError, class_name, describe, register, registered  # noqa: E402
from .registry import load as load_form  # noqa: E402
from .registry import save as save_form  # noqa: E402
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
    to_calibration,
    to_zero_point,
)
from . import extra  # noqa: E402  (more forms: radial term, pixel grid, turbulence field)
