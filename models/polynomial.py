"""2-d polynomial transform in an orthogonal basis of normalised coordinates."""

from __future__ import annotations

import numpy as np
from jaxtyping import Array, Float

from .basis import basis_2d, n_terms
from .core import Transform, fixed_field, namespace


class Polynomial(Transform):
    """(x, y) -> (sum_k a_k B_k(u, v), sum_k b_k B_k(u, v)), u = (x - cx) / hx, v = (y - cy) / hy.

    `coeffs[0]` / `coeffs[1]` are the coefficients of the two outputs, terms ordered as in
    `basis.term_powers`. The normalisation (centre, half-width) is data, not fitted.
    """

    coeffs: Float[Array, "2 terms"]
    center: Float[Array, "2"] = fixed_field()
    half_width: Float[Array, "2"] = fixed_field()
    order: int = fixed_field(static=True)
    family: str = fixed_field(static=True, default="legendre")

    def __call__(self, x, y):
        u = (x - self.center[0]) / self.half_width[0]
        v = (y - self.center[1]) / self.half_width[1]
        b = basis_2d(u, v, self.order, self.family, xp=namespace(u, v, self.coeffs))
        return b @ self.coeffs[0], b @ self.coeffs[1]

    @staticmethod
    def design(x, y, center, half_width, order: int, family: str = "legendre") -> np.ndarray:
        """(n, n_terms) basis matrix at points (x, y): for linear least-squares initialisation."""
        u = (np.asarray(x) - center[0]) / half_width[0]
        v = (np.asarray(y) - center[1]) / half_width[1]
        return basis_2d(u, v, order, family, xp=np)

    @staticmethod
    def n_terms(order: int) -> int:
        return n_terms(order)
