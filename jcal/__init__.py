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

import sys
import types

# The public names, imported on first use (PEP 562): `import jcal` stays cheap.
_EXPORTS = {
    "fit": ".api", "Association": ".associate", "associate": ".associate", "ConfigError": ".config",
    "FitConfig": ".config", "Camera": ".data", "CcdVisit": ".data", "InputData": ".data", "InputError": ".data",
    "ReferenceCatalog": ".data", "SourceCatalog": ".data", "VisitTable": ".data", "read_input": ".io",
    "write_input": ".io", "FitResult": ".result", "SimConfig": ".simulate", "Simulation": ".simulate",
    "simulate": ".simulate", "write_simulation": ".simulate", "PhotometricSolution": ".photometry_solution",
    "load_photometric_model": ".photometry_solution", "AstrometricSolution": ".solution",
    "load_model": ".solution", "FitError": ".solver", "SingularSystemError": ".solver",
    "save_photometric_model": ".photometry_solution", "save_model": ".solution",
    "JaxConfigurationError": ".jax_setup", "configure": ".jax_setup",
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
    "FitResult", "InputData", "InputError", "JaxConfigurationError", "PhotometricSolution", "ReferenceCatalog",
    "SimConfig", "Simulation", "SingularSystemError", "SourceCatalog", "VisitTable", "associate", "configure", "fit",
    "load_model", "load_photometric_model", "read_input", "save_model", "save_photometric_model", "simulate",
    "write_input", "write_simulation",
]
