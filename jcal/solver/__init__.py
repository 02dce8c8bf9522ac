"""Structured Gauss-Newton: autodiff Jacobian blocks, star elimination (Schur), dense reduced solve."""

import jax  # noqa: F401 - imported before _configure_jax reads its config

from .. import _configure_jax

_configure_jax()  # settings JAX reads only from its config, not its environment (async dispatch)

from .gauss_newton import (  # noqa: E402
    FitError, FitState, SingularSystemError, Solver, StructuredProblem, implicit_function)
from .layout import ParameterLayout  # noqa: E402

__all__ = ["FitError", "FitState", "implicit_function", "ParameterLayout", "SingularSystemError", "Solver", "StructuredProblem"]
