"""Structured Gauss-Newton: autodiff Jacobian blocks, star elimination (Schur), dense reduced solve."""

from .gauss_newton import FitError, FitState, SingularSystemError, Solver, StructuredProblem, implicit_function
from .layout import ParameterLayout

__all__ = ["FitError", "FitState", "implicit_function", "ParameterLayout", "SingularSystemError", "Solver", "StructuredProblem"]
