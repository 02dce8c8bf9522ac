"""jcal: joint astrometric and photometric calibration of overlapping exposures, on JAX.

    import jcal
    sim = jcal.simulate("small")
    result = jcal.fit(sim.data, jcal.FitConfig())
    result.write("out/")

Layout: data model (`data`), inputs (`io`), association (`associate`), model forms
(`jcal_models`, the top-level `models/` folder), solver (`solver`), fits (`calibration`), results
(`result`, `solution`), Task facade (`task`), command line (`cli`).
"""

import os

# XLA's multi-threaded Eigen pool on CPU was seen to wedge for good (every worker idle, the
# result never ready) in jcal's large vmapped steps with jaxlib 0.10.2; single-threaded Eigen
# avoids it at a small cost. Takes effect only if set before JAX's first computation; opt
# out with JCAL_XLA_MULTITHREAD=1. The flag is ignored by GPU backends.
if os.environ.get("JCAL_XLA_MULTITHREAD") != "1" and "xla_cpu_multi_thread_eigen" not in os.environ.get(
        "XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)  # sky positions need float64
# CPU async dispatch hangs some large programs for good (jax-ml/jax#25861, seen here too);
# jcal synchronises after every step anyway, so nothing is lost by turning it off.
jax.config.update("jax_cpu_enable_async_dispatch", False)
# Compiled steps persist across processes (a new fit of a similar survey skips compilation).
# JCAL_COMPILATION_CACHE=DIR chooses the folder, =0 turns it off.
_cache = os.environ.get("JCAL_COMPILATION_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "jcal", "xla"))
if _cache != "0" and not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", _cache)
    # Programs compiling in over 0.1 s are kept (15 of ~100 per medium fit, ~1 MB): reading and
    # fitting medium again takes 15.6 s, against ~21 s at 0.5 s (most of jcal's programs compile
    # in 0.1-0.5 s). Keeping all ~100 saved 1 s more but cost ~0.5 s of a cold fit.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)

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
from .calibration.photometry import PhotometricSolution, load_photometric_model  # noqa: E402
from .solution import AstrometricSolution, load_model  # noqa: E402
from .solver import FitError, SingularSystemError  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "Association", "AstrometricSolution", "Camera", "CcdVisit", "ConfigError", "FitConfig", "FitError",
    "FitResult", "InputData", "InputError", "PhotometricSolution", "load_photometric_model", "ReferenceCatalog", "SimConfig", "Simulation", "SingularSystemError",
    "SourceCatalog", "VisitTable", "associate", "fit", "load_model", "read_input", "simulate", "write_input",
    "write_simulation",
]
