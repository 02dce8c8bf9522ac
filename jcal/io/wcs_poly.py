"""Algebra of bivariate polynomials batched over many detector-visits, for FITS WCS exports.

A polynomial is a (K, n + 1, n + 1, t) array `D` of coefficients: item k's component j is
sum_{p, q} D[k, p, q, j] u^p v^q. The WCS writers fit one polynomial per detector-visit about
the detector centre (well conditioned) and then re-express it exactly: about the pixel where it
reaches the tangent point (SIP and TPV put CRPIX there) and, for TPV, as a function of the
linear intermediate coordinates (CD applied first).
"""

from __future__ import annotations

import numpy as np

Terms = list[tuple[int, int]]


def terms(lo: int, hi: int) -> Terms:
    """Exponents (p, q) of u^p v^q with lo <= p + q <= hi, by degree then decreasing p."""
    return [(p, d - p) for d in range(lo, hi + 1) for p in range(d, -1, -1)]


def dense(coef: np.ndarray, exps: Terms, order: int) -> np.ndarray:
    """(K, k, t) coefficients of the monomials `exps` -> (K, order + 1, order + 1, t) array."""
    out = np.zeros((coef.shape[0], order + 1, order + 1, coef.shape[2]))
    for i, (p, q) in enumerate(exps):
        out[:, p, q] = coef[:, i]
    return out


def pick(d: np.ndarray, exps: Terms) -> np.ndarray:
    """Inverse of `dense`: (K, n + 1, n + 1, t) -> (K, len(exps), t)."""
    return np.stack([d[:, p, q] for p, q in exps], axis=1) if exps else np.zeros((d.shape[0], 0, d.shape[3]))


def _times_linear(poly: np.ndarray, a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """(K, n + 1, n + 1) polynomial in (z1, z2) times (a z1 + b z2 + c), truncated at n."""
    out = c[:, None, None] * poly
    out[:, 1:, :] += a[:, None, None] * poly[:, :-1, :]
    out[:, :, 1:] += b[:, None, None] * poly[:, :, :-1]
    return out


def compose_linear(d: np.ndarray, m: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """Coefficients of z -> P(m z + shift), exact: P (K, n+1, n+1, t), m (K, 2, 2), shift (K, 2).

    A linear substitution keeps the degree, so the result has the same shape.
    """
    k, n1 = d.shape[0], d.shape[1]
    one = np.zeros((k, n1, n1))
    one[:, 0, 0] = 1.0
    out = np.zeros_like(d)
    u_power = one
    for p in range(n1):
        term = u_power
        for q in range(n1 - p):
            out += term[..., None] * d[:, p, q, None, None, :]
            term = _times_linear(term, m[:, 1, 0], m[:, 1, 1], shift[:, 1])
        u_power = _times_linear(u_power, m[:, 0, 0], m[:, 0, 1], shift[:, 0])
    return out


def evaluate(d: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """P at points u, v of shape (K, ...) -> (K, ..., t)."""
    n1 = d.shape[1]
    out = 0.0
    u_power = np.ones_like(u)
    for p in range(n1):
        term = u_power
        for q in range(n1 - p):
            out = out + term[..., None] * d[:, p, q].reshape((d.shape[0],) + (1,) * (u.ndim - 1) + (-1,))
            term = term * v
        u_power = u_power * u
    return out


def derivative(d: np.ndarray, axis: int) -> np.ndarray:
    """dP/du (axis 0) or dP/dv (axis 1), same shape."""
    out = np.zeros_like(d)
    n1 = d.shape[1]
    k = np.arange(1, n1)
    if axis == 0:
        out[:, :-1] = d[:, 1:] * k[None, :, None, None]
    else:
        out[:, :, :-1] = d[:, :, 1:] * k[None, None, :, None]
    return out


def root(d: np.ndarray, iterations: int = 30) -> np.ndarray:
    """(K, 2) point where the 2-component polynomial P vanishes, by Newton from its linear part.

    Raises ValueError where it does not converge (a map too far from linear for its tangent
    point to be found by extrapolating it).
    """
    du, dv = derivative(d, 0), derivative(d, 1)
    z = np.zeros((d.shape[0], 2))
    for _ in range(iterations):
        f = evaluate(d, z[:, 0], z[:, 1])
        jac = np.stack([evaluate(du, z[:, 0], z[:, 1]), evaluate(dv, z[:, 0], z[:, 1])], axis=-1)  # (K, 2, 2)
        step = np.linalg.solve(jac, f[..., None])[..., 0]
        z = z - step
        if np.all(np.abs(step) <= 1e-13 * (1.0 + np.abs(z))):
            return z
    bad = ~np.isfinite(z).all(axis=1) | (np.abs(evaluate(d, z[:, 0], z[:, 1])) > 1e-9 * np.abs(d).max()).any(axis=1)
    if bad.any():
        raise ValueError(f"the tangent point of {int(bad.sum())} detector-visit(s) cannot be located in pixels "
                         "(the fitted map is too far from linear to extrapolate to it)")
    return z
