"""jcal: joint astrometric and photometric calibration of overlapping exposures, on JAX.

    import jcal
    sim = jcal.simulate("small")
    result = jcal.fit(sim.data, jcal.FitConfig())
    result.write("out/")

Layout: data model (`data`), inputs (`io`), association (`associate`), model forms
(`jcal_models`, the top-level `models/` folder), solver (`solver`), fits (`calibration`), results
(`result`, `solution`), Task facade (`task`), command line (`cli`).

Importing jcal changes no JAX setting: `jcal.configure()` sets what the fits need (64-bit floats,
CPU threading, the compilation cache; `jcal.jax_setup`). `jcal.fit`, the Task facade and the
CLI call it when nobody has; call it yourself first thing to get all of it (XLA flags only take
effect before JAX's first computation).
"""

from .api import fit
from .associate import Association, associate
from .config import ConfigError, FitConfig
from .data import (
    Camera,
    CcdVisit,
    InputData,
    InputError,
    ReferenceCatalog,
    SourceCatalog,
    VisitTable,
)
from .io import read_input, write_input
from .result import FitResult
from .simulate import SimConfig, Simulation, simulate, write_simulation
from .calibration.photometry import PhotometricSolution, load_photometric_model, save_photometric_model
from .jax_setup import JaxConfigurationError, configure
from .solution import AstrometricSolution, load_model, save_model
from .solver import FitError, SingularSystemError

__version__ = "0.1.0"

__all__ = [
    "Association", "AstrometricSolution", "Camera", "CcdVisit", "ConfigError", "FitConfig", "FitError",
    "FitResult", "InputData", "InputError", "JaxConfigurationError", "PhotometricSolution", "ReferenceCatalog",
    "SimConfig", "Simulation", "SingularSystemError", "SourceCatalog", "VisitTable", "associate", "configure", "fit",
    "load_model", "load_photometric_model", "read_input", "save_model", "save_photometric_model", "simulate",
    "write_input", "write_simulation",
]
