"""Batched linear algebra for tiny matrices (q <= 5), in plain jnp: no LAPACK calls.

Why not `jnp.linalg`: on CPU, jaxlib 0.10's batched LAPACK kernels split a batch over the
intra-op thread pool and block a pool worker until the pieces finish; two such kernels
running at once on a 2-thread pool wait on each other for ever (seen here: every worker
parked in `ParallelBatchMap`). Star blocks are 2x2 to 5x5, so unrolled formulas over the
static size are as fast, run the same on GPU, and cannot deadlock.
All functions take (..., q, q) arrays and broadcast over the leading axes.
"""

from __future__ import annotations

import jax.numpy as jnp


def cholesky(a: jnp.ndarray) -> jnp.ndarray:
    """Lower Cholesky factor of symmetric positive-definite (..., q, q); NaN where not SPD."""
    q = a.shape[-1]
    cols = [[None] * q for _ in range(q)]
    for j in range(q):
        s = a[..., j, j] - sum(cols[j][k] ** 2 for k in range(j))
        d = jnp.sqrt(jnp.where(s > 0, s, jnp.nan))
        cols[j][j] = d
        for i in range(j + 1, q):
            cols[i][j] = (a[..., i, j] - sum(cols[i][k] * cols[j][k] for k in range(j))) / d
    zero = jnp.zeros_like(a[..., 0, 0])
    return jnp.stack([jnp.stack([cols[i][j] if j <= i else zero for j in range(q)], -1) for i in range(q)], -2)


def solve_lower(l: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
    """x with l x = b; l (..., q, q) lower triangular, b (..., q) or (..., q, m)."""
    vector = b.ndim == l.ndim - 1
    if vector:
        b = b[..., None]
    q = l.shape[-1]
    rows = []
    for i in range(q):
        acc = b[..., i, :] - sum(l[..., i, k, None] * rows[k] for k in range(i)) if i else b[..., i, :]
        rows.append(acc / l[..., i, i, None])
    x = jnp.stack(rows, -2)
    return x[..., 0] if vector else x


def solve_upper_transposed(l: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
    """x with l^T x = b (l lower triangular); b (..., q) or (..., q, m)."""
    vector = b.ndim == l.ndim - 1
    if vector:
        b = b[..., None]
    q = l.shape[-1]
    rows = [None] * q
    for i in reversed(range(q)):
        acc = b[..., i, :] - sum(l[..., k, i, None] * rows[k] for k in range(i + 1, q))
        rows[i] = acc / l[..., i, i, None]
    x = jnp.stack(rows, -2)
    return x[..., 0] if vector else x


def cho_solve(l: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
    """x with (l l^T) x = b."""
    return solve_upper_transposed(l, solve_lower(l, b))


def spd_inverse(a: jnp.ndarray) -> jnp.ndarray:
    """Inverse of symmetric positive-definite (..., q, q)."""
    l = cholesky(a)
    eye = jnp.broadcast_to(jnp.eye(a.shape[-1]), a.shape)
    return cho_solve(l, eye)
