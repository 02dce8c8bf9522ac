"""Structured Gauss-Newton: autodiff Jacobian blocks, star elimination (Schur), dense reduced solve."""

from .gauss_newton import FitError, FitState, SingularSystemError, Solver, StructuredProblem
from .layout import ParameterLayout

__all__ = ["FitError", "FitState", "ParameterLayout", "SingularSystemError", "Solver", "StructuredProblem"]
