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
import sys
import types

# XLA's multi-threaded Eigen pool on CPU was seen to wedge for good (every worker idle, the
# result never ready) in jcal's large vmapped steps with jaxlib 0.10.2; single-threaded Eigen
# avoids it at a small cost. Takes effect only if set before JAX's first computation; opt
# out with JCAL_XLA_MULTITHREAD=1. The flag is ignored by GPU backends.
if os.environ.get("JCAL_XLA_MULTITHREAD") != "1" and "xla_cpu_multi_thread_eigen" not in os.environ.get(
        "XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()

# JAX's settings: x64 (sky positions need float64); no CPU async dispatch (it hangs some large
# programs for good, jax-ml/jax#25861, seen here too; jcal synchronises after every step anyway);
# compiled steps persist across processes (a new fit of a similar survey skips compilation;
# JCAL_COMPILATION_CACHE=DIR chooses the folder, =0 turns it off). Programs compiling in over
# 0.1 s are kept (15 of ~100 per medium fit, ~1 MB): reading and fitting medium again takes
# 15.6 s, against ~21 s at 0.5 s; keeping all ~100 saved 1 s more but cost ~0.5 s of a cold fit.
# Set through JAX's environment variables when JAX is not imported yet, so that `import jcal`
# (and `jcal --help`) does not pay for importing JAX: whichever module imports it first gets
# these settings.
_cache = os.environ.get("JCAL_COMPILATION_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "jcal", "xla"))
_JAX_SETTINGS = {"jax_enable_x64": True, "jax_cpu_enable_async_dispatch": False}
if _cache != "0":
    _JAX_SETTINGS.update(jax_compilation_cache_dir=_cache, jax_persistent_cache_min_compile_time_secs=0.1)


def _configure_jax() -> None:
    if "jax" not in sys.modules:
        for name, value in _JAX_SETTINGS.items():
            if name == "jax_compilation_cache_dir" and os.environ.get(name.upper()):
                continue  # the user's own cache folder wins
            os.environ[name.upper()] = str(value) if not isinstance(value, bool) else str(int(value))
        return
    import jax
    for name, value in _JAX_SETTINGS.items():
        if name == "jax_compilation_cache_dir" and jax.config.jax_compilation_cache_dir:
            continue
        jax.config.update(name, value)


_configure_jax()

# The public names, imported on first use (PEP 562): `import jcal` stays cheap.
_EXPORTS = {
    "fit": ".api", "Association": ".associate", "associate": ".associate", "ConfigError": ".config",
    "FitConfig": ".config", "Camera": ".data", "CcdVisit": ".data", "InputData": ".data", "InputError": ".data",
    "ReferenceCatalog": ".data", "SourceCatalog": ".data", "VisitTable": ".data", "read_input": ".io",
    "write_input": ".io", "FitResult": ".result", "SimConfig": ".simulate", "Simulation": ".simulate",
    "simulate": ".simulate", "write_simulation": ".simulate", "PhotometricSolution": ".calibration.photometry",
    "load_photometric_model": ".calibration.photometry", "AstrometricSolution": ".solution",
    "load_model": ".solution", "FitError": ".solver", "SingularSystemError": ".solver",
}


def __getattr__(name: str):
    import importlib
    import importlib.util
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f"{__name__}.{name}")  # `jcal.io`, `jcal.task`, ... as before
    raise AttributeError(f"module 'jcal' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))


class _Package(types.ModuleType):
    """`jcal.simulate` and `jcal.associate` are functions, not the submodules of those names:
    loading such a submodule must not replace the function (the import system sets the
    package's attribute after the submodule loads)."""

    def __setattr__(self, name, value):
        if name in _EXPORTS and isinstance(value, types.ModuleType) and value.__name__ == f"{__name__}.{name}":
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


__version__ = "0.1.0"

__all__ = [
    "Association", "AstrometricSolution", "Camera", "CcdVisit", "ConfigError", "FitConfig", "FitError",
    "FitResult", "InputData", "InputError", "PhotometricSolution", "load_photometric_model", "ReferenceCatalog", "SimConfig", "Simulation", "SingularSystemError",
    "SourceCatalog", "VisitTable", "associate", "fit", "load_model", "read_input", "simulate", "write_input",
    "write_simulation",
]
