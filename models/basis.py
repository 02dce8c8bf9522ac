"""Orthogonal polynomial bases in two variables on [-1, 1]^2.

The monomial basis makes normal equations ill-conditioned (see the solver notes); Legendre
and Chebyshev polynomials of normalised coordinates keep each block close to diagonal.
Terms are ordered by total degree, then by the power of y: 1, x, y, x^2, xy, y^2, ...
"""

from __future__ import annotations

import jax.numpy as jnp


def term_powers(order: int) -> list[tuple[int, int]]:
    """(i, j) powers of x and y of every term of total degree <= order."""
    return [(d - j, j) for d in range(order + 1) for j in range(d + 1)]


def n_terms(order: int) -> int:
    return (order + 1) * (order + 2) // 2


def _legendre_1d(u, order: int) -> list:
    p = [u * 0 + 1, u]
    for n in range(1, order):
        p.append(((2 * n + 1) * u * p[n] - n * p[n - 1]) / (n + 1))
    return p[: order + 1]


def _chebyshev_1d(u, order: int) -> list:
    t = [u * 0 + 1, u]
    for _ in range(1, order):
        t.append(2 * u * t[-1] - t[-2])
    return t[: order + 1]


_FAMILIES = {"legendre": _legendre_1d, "chebyshev": _chebyshev_1d}


def basis_2d(u, v, order: int, family: str = "legendre", xp=jnp):
    """Basis values, shape u.shape + (n_terms(order),), at normalised coordinates (u, v).

    `xp` is the array namespace: jax.numpy in models, numpy for host-side set-up."""
    one_d = _FAMILIES[family]
    pu, pv = one_d(u, order), one_d(v, order)
    return xp.stack([pu[i] * pv[j] for i, j in term_powers(order)], axis=-1)
