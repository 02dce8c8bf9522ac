"""jcal: joint astrometric and photometric calibration of overlapping exposures, on JAX.

    import jcal
    sim = jcal.simulate("small")
    result = jcal.fit(sim.data, jcal.FitConfig())
    result.write("out/")

Layout: data model (`data`), inputs (`io`), association (`associate`), model forms
(`jcal_models`, the top-level `models/` folder), solver (`solver`), fits (`fit`), results
(`result`, `solution`), Task facade (`task`), command line (`cli`).
"""

import jax

jax.config.update("jax_enable_x64", True)  # sky positions need float64

from .api import fit  # noqa: E402
from .associate import Association, associate  # noqa: E402
from .config import ConfigError, FitConfig  # noqa: E402
from .data import (  # noqa: E402
    Camera,
    CcdVisit,
    InputData,
    InputError,
    ReferenceCatalog,
    SourceCatalog,
    VisitTable,
)
from .io import read_input, write_input  # noqa: E402
from .result import FitResult  # noqa: E402
from .simulate import SimConfig, Simulation, simulate, write_simulation  # noqa: E402
from .solution import AstrometricSolution, load_model  # noqa: E402
from .solver import FitError, SingularSystemError  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "Association", "AstrometricSolution", "Camera", "CcdVisit", "ConfigError", "FitConfig", "FitError",
    "FitResult", "InputData", "InputError", "ReferenceCatalog", "SimConfig", "Simulation", "SingularSystemError",
    "SourceCatalog", "VisitTable", "associate", "fit", "load_model", "read_input", "simulate", "write_input",
    "write_simulation",
]
