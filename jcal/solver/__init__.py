"""Structured Gauss-Newton: autodiff Jacobian blocks, star elimination (Schur), dense reduced solve.

- `problem`: what the solver is given (`StructuredProblem`), its prepared form, the `FitState`;
- `gauss_newton`: the `Solver` (stages: iterations, damping, line search);
- `outliers`: the outlier policy; `diagnostics`: covariances, leave-one-out chi2, singular systems;
- `implicit`: a solution as a differentiable function of the inputs;
- `normal_equations`, `layout`, `programs`: the block equations, their layout, their compiled programs.
"""

from .gauss_newton import Solver
from .implicit import implicit_function
from .layout import ParameterLayout
from .problem import FitError, FitState, PreparedProblem, SingularSystemError, StructuredProblem, prepare

__all__ = ["FitError", "FitState", "implicit_function", "ParameterLayout", "PreparedProblem", "prepare",
           "SingularSystemError", "Solver", "StructuredProblem"]
