"""One Gauss-Newton step of a structured least-squares problem, on device (CPU or GPU).

Unknowns: mapping parameters m (flat, N) and star parameters s (q per star). Residuals:
- per measurement i, r_i(m_view_i, s_star(i)) of dimension d (2 astrometry, 1 photometry),
  already whitened by the measurement error;
- per star, r_s(s) (reference-catalog constraints), also whitened.

J is never formed over all parameters: `jax.vmap(jax.jacrev(...))` gives each measurement's
(d, P_local) block for the groups it touches and its (d, q) star block. Then

    [H_mm  H_ms] [dm]   [b_m]          Schur complement over the stars (H_ss block-diagonal):
    [H_sm  H_ss] [ds] = [b_s]    ->    (H_mm - H_ms H_ss^-1 H_sm) dm = b_m - H_ms H_ss^-1 b_s,
                                       ds = H_ss^-1 (b_s - H_sm dm).

H_mm is accumulated per block group (a detector-visit) as one batched matmul; the fill
H_ms H_ss^-1 H_sm per spatial tile of stars as a dense matmul in tile-local coordinates; both
are scattered as (p_k x p_l) windows into a block matrix, never element by element.

The fill is most of a step's work on large problems, and the reduced matrix changes little
from one step to the next (the mapping is nearly linear in its coefficients; outlier rounds
reweight a few terms). So a step may instead solve the reduced system by conjugate gradients,
with matrix-free products (two passes over the Jacobian blocks) preconditioned by the Cholesky
factor of an earlier step's reduced matrix (`Preconditioner`): a few products replace the fill.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.linalg import cho_solve

from jcal_models import gather

from . import small_linalg as small
from .layout import ParameterLayout


class System(NamedTuple):
    """Device arrays describing one problem's structure (see layout.py)."""

    index: dict[str, jax.Array]  # group key -> (n,) group per measurement; includes "star"
    columns: jax.Array  # (n, P_local) global mapping column per local column
    block_members: jax.Array  # (B, M)
    block_groups: jax.Array  # (B, n_leaves)
    tiles: tuple["TileSet", ...]  # classes of spatial star tiles, each with its own padded shapes


class TileSet(NamedTuple):
    """One class of star tiles (see layout.Tiles)."""

    stars: jax.Array  # (T, S_t) star in each tile slot (padding S)
    measurements: jax.Array  # (T, M_t)
    star_local: jax.Array  # (T, M_t)
    slots: tuple[jax.Array, ...]  # per leaf (T, M_t)
    groups: tuple[jax.Array, ...]  # per leaf (T, K_k)


class Step(NamedTuple):
    delta_mapping: jax.Array  # (N,)
    delta_stars: jax.Array  # (S, q)
    chi2: jax.Array  # at the current parameters
    reduced_diagonal: jax.Array  # (N,) diagonal of the reduced system (to name degeneracies)
    cholesky_ok: jax.Array  # bool
    predicted_decrease: jax.Array = 0.0  # chi2 decrease of the full step if the model were linear
    scaled_matrix: jax.Array | None = None  # Jacobi-scaled reduced matrix (None: not assembled)
    factor: jax.Array | None = None  # (N, N) its Cholesky factor (None: not assembled)
    iterations: jax.Array = 0  # conjugate-gradient iterations (0: direct solve)


class Preconditioner(NamedTuple):
    """An earlier step's reduced matrix, Jacobi-scaled and factored, to precondition CG solves."""

    factor: jax.Array  # (N, N) lower Cholesky factor of D H D
    scale: jax.Array  # (N,) D = 1 / sqrt(diag H)

    @classmethod
    def of(cls, step: "Step") -> "Preconditioner":
        """From an assembled step (`step.factor` not None)."""
        return cls(step.factor, _jacobi_scale(step.reduced_diagonal))

    @classmethod
    def of_matrix(cls, h: jax.Array) -> "Preconditioner":
        """From a reduced matrix (N, N)."""
        d = _jacobi_scale(jnp.diagonal(h))
        return cls(jnp.linalg.cholesky(h * d[:, None] * d[None, :]), d)


def _jacobi_scale(diag: jax.Array) -> jax.Array:
    return 1.0 / jnp.sqrt(jnp.where(diag > 0, diag, 1.0))


def _flat_rows(tree, d: int) -> jax.Array:
    """Concatenate the leaves of a Jacobian pytree into (d, P)."""
    leaves = jax.tree.leaves(tree)
    return jnp.concatenate([a.reshape(d, -1) for a in leaves], axis=1) if leaves else jnp.zeros((d, 0))


def _star_view(tree, s):
    return jax.tree.map(lambda a: a[s], tree)


def measurement_terms(residual_fn: Callable, mapping, stars, data, index, with_jacobian: bool = True,
                      mapping_jacobian: bool = True):
    """Per-measurement residuals (n, d) and, optionally, Jacobian blocks (n, d, P) and (n, d, q).

    `mapping` and `stars` are (params, static) pairs from `eqx.partition`. Without
    `mapping_jacobian` only the star blocks are differentiated (the mapping block is None).
    """
    (pm, sm), (ps, ss) = mapping, stars

    def one(idx, datum):
        def f(pm_view, ps_view):
            model = eqx.combine(pm_view, gather(sm, idx))
            star = eqx.combine(ps_view, _star_view(ss, idx["star"]))
            return residual_fn(model, star, datum)

        pm_view, ps_view = gather(pm, idx), _star_view(ps, idx["star"])
        r = f(pm_view, ps_view)
        if not with_jacobian:
            return r
        if not mapping_jacobian:
            return r, None, _flat_rows(jax.jacrev(f, argnums=1)(pm_view, ps_view), r.shape[0])
        jm, js = jax.jacrev(f, argnums=(0, 1))(pm_view, ps_view)
        return r, _flat_rows(jm, r.shape[0]), _flat_rows(js, r.shape[0])

    return jax.vmap(one)(index, data)


def star_terms(prior_fn: Callable | None, stars, star_data, with_jacobian: bool = True):
    """Per-star prior residuals (S, k) and Jacobians (S, k, q) (reference constraints)."""
    ps, ss = stars

    def one(ps_view, ss_view, datum):
        f = lambda p: prior_fn(eqx.combine(p, ss_view), datum)  # noqa: E731
        r = f(ps_view)
        if not with_jacobian:
            return r
        return r, _flat_rows(jax.jacrev(f)(ps_view), r.shape[0])

    return jax.vmap(one)(ps, ss, star_data)


def chi2_terms(terms: "Terms", weights, star_weights):
    """(n,) and (S,) chi2 contributions of measurements and star priors (weights applied), from
    `linear_terms`: the solver evaluates a trial point with the linearisation its next scoring
    or step needs anyway."""
    chi2_m = weights * jnp.sum(terms.r**2, axis=1)
    if terms.rp is None:
        return chi2_m, jnp.zeros(star_weights.shape)
    return chi2_m, star_weights * jnp.sum(terms.rp**2, axis=1)


def assemble_reduced(layout: ParameterLayout, system: System, jm: jax.Array, ws: jax.Array | None,
                     fill_dtype=jnp.float64):
    """Dense reduced normal matrix (N, N): H_mm - fill, the fill's products in `fill_dtype`
    (float32 for a preconditioner: half the work, accumulated in float64).

    jm: (n, d, P) whitened, weighted, masked mapping Jacobians.
    ws: (n, q, d) = L_s^-1 J_s^T per measurement (`_whitened_star_rows`), or None when stars are fixed.
    """
    n_leaves = len(layout.row_sizes)
    blocks = {(k, l): jnp.zeros((layout.n_groups[k], layout.n_groups[l], layout.row_sizes[k],
                                 layout.row_sizes[l]))
              for k in range(n_leaves) for l in range(n_leaves)}
    pad_j = jnp.concatenate([jm, jnp.zeros((1,) + jm.shape[1:])], axis=0)

    # H_mm: per block group, J^T J over its members (one batched matmul)
    jb = pad_j[system.block_members]  # (B, M, d, P)
    jb = jb.reshape(jb.shape[0], -1, jb.shape[-1])
    hb = jnp.einsum("bmi,bmj->bij", jb, jb)  # (B, P, P)
    splits = list(layout.local_offsets[1:])
    for k, hk in enumerate(jnp.split(hb, splits, axis=1)):
        for l, hkl in enumerate(jnp.split(hk, splits, axis=2)):
            blocks[k, l] = blocks[k, l].at[system.block_groups[:, k], system.block_groups[:, l]].add(
                hkl, mode="drop")

    if ws is not None:
        blocks = _subtract_fill(layout, system, jm.astype(fill_dtype), ws.astype(fill_dtype), blocks)

    rows = [jnp.concatenate([blocks[k, l].transpose(0, 2, 1, 3).reshape(
        layout.n_groups[k] * layout.row_sizes[k], layout.n_groups[l] * layout.row_sizes[l])
        for l in range(n_leaves)], axis=1) for k in range(n_leaves)]
    return jnp.concatenate(rows, axis=0)


def _subtract_fill(layout: ParameterLayout, system: System, jm: jax.Array, ws: jax.Array, blocks: dict) -> dict:
    """blocks -= sum over stars of B_s H_ss^-1 B_s^T, one spatial tile of stars at a time.

    Per measurement, G = L_s^-1 J_s^T J_m (q, P) is its star's whitened column of B_s^T; it is
    formed per tile from `jm` and `ws`, in cache: as (n, q, P) arrays over all measurements,
    G and J_m^T J_s were most of a medium step's memory traffic."""
    q = ws.shape[1]
    pad_j = jnp.concatenate([jm, jnp.zeros((1,) + jm.shape[1:], jm.dtype)], axis=0)
    pad_w = jnp.concatenate([ws, jnp.zeros((1,) + ws.shape[1:], ws.dtype)], axis=0)
    splits = list(layout.local_offsets[1:])
    n_leaves = len(layout.row_sizes)

    def one_tile(carry, tile, n_star_slots):
        meas, star_local, slots, groups = tile
        g = jnp.einsum("mqd,mdp->mqp", pad_w[meas], pad_j[meas])  # (M, q, P)
        phis = []
        for k, gk in enumerate(jnp.split(g, splits, axis=2)):  # (M, q, p_k)
            kk = groups[k].shape[0]
            phi = jnp.zeros((kk, layout.row_sizes[k], n_star_slots, q), ws.dtype)
            phi = phi.at[slots[k], :, star_local, :].add(gk.transpose(0, 2, 1))
            phis.append(phi.reshape(kk * layout.row_sizes[k], n_star_slots * q))
        phi = jnp.concatenate(phis, axis=0)  # (N_tile, stars*q)
        fill = phi @ phi.T
        sizes = [groups[k].shape[0] * layout.row_sizes[k] for k in range(n_leaves)]
        cuts = np.cumsum(sizes)[:-1].tolist()
        new = dict(carry)
        for k, fk in enumerate(jnp.split(fill, cuts, axis=0)):
            for l, fkl in enumerate(jnp.split(fk, cuts, axis=1)):
                kk, kl = groups[k].shape[0], groups[l].shape[0]
                part = fkl.reshape(kk, layout.row_sizes[k], kl, layout.row_sizes[l]).transpose(0, 2, 1, 3)
                part = -part.astype(new[k, l].dtype)  # a float32 fill accumulates in float64
                new[k, l] = new[k, l].at[groups[k][:, None], groups[l][None, :]].add(part, mode="drop")
        return new, None

    for tiles in system.tiles:
        step = functools.partial(one_tile, n_star_slots=int(tiles.stars.shape[1]))
        blocks, _ = jax.lax.scan(step, blocks, (tiles.measurements, tiles.star_local, tiles.slots, tiles.groups))
    return blocks


def _star_cholesky(h_ss: jax.Array) -> jax.Array:
    """Batched Cholesky of the (S, q, q) star blocks, with a tiny relative jitter."""
    q = h_ss.shape[-1]
    scale = jnp.maximum(jnp.max(jnp.abs(jnp.diagonal(h_ss, axis1=1, axis2=2)), axis=1), 1.0)
    return small.cholesky(h_ss + 1e-12 * scale[:, None, None] * jnp.eye(q))


class Terms(NamedTuple):
    """Residuals and Jacobian blocks at one point, before weights and masks (`linear_terms`)."""

    r: jax.Array  # (n, d) whitened residuals
    jm: jax.Array | None  # (n, d, P) mapping Jacobian blocks (None: not computed)
    js: jax.Array  # (n, d, q) star Jacobian blocks
    rp: jax.Array | None  # (S, k) prior residuals (None: no prior)
    jp: jax.Array | None  # (S, k, q) their Jacobian blocks


def linear_terms(residual_fn, prior_fn, mapping, stars, data, star_data, index,
                 mapping_jacobian: bool = True) -> Terms:
    """Every residual and Jacobian block at the current parameters: the autodiff part of a step.

    Weights and masks are applied later (`weigh`), so one linearisation serves the outlier
    scoring and the stars-only refit that follows it (same point, new weights).
    """
    r, jm, js = measurement_terms(residual_fn, mapping, stars, data, index, mapping_jacobian=mapping_jacobian)
    rp, jp = star_terms(prior_fn, stars, star_data) if prior_fn is not None else (None, None)
    return Terms(r, jm, js, rp, jp)


class Linearised(NamedTuple):
    r: jax.Array  # (n, d) weighted residuals
    jm: jax.Array | None  # (n, d, P) weighted, masked mapping Jacobian blocks (None: not needed)
    js: jax.Array  # (n, d, q) weighted, masked star Jacobian blocks
    chi2: jax.Array
    h_ss: jax.Array  # (S, q, q) star blocks, fixed parameters given identity rows
    b_s: jax.Array  # (S, q) star right-hand side (-J_s^T r)
    r_all: jax.Array  # (n, d) residuals of every measurement, rejected ones too (weight 1)
    js_all: jax.Array  # (n, d, q) their masked star Jacobian blocks
    rp: jax.Array | None  # (S, k) weighted prior residuals (None: no prior)
    jp: jax.Array | None  # (S, k, q) their weighted, masked Jacobian blocks


def weigh(terms: Terms, system: System, weights, star_weights, mapping_mask, star_mask,
          mapping_jacobian: bool = True) -> Linearised:
    """Apply weights (outliers 0) and masks (fixed parameters 0) to `terms`, and form the
    block-diagonal star part of the normal equations. Without `mapping_jacobian`, `jm` is None.
    Only `system.index` and `system.columns` are read."""
    star = system.index["star"]
    n_stars = star_weights.shape[0]
    sw = jnp.sqrt(weights)[:, None]
    r_all, js_all = terms.r, terms.js * star_mask[star][:, None, :]
    r = r_all * sw
    chi2 = jnp.sum(r**2)
    jm = terms.jm * sw[:, :, None] * mapping_mask[system.columns][:, None, :] if mapping_jacobian else None
    js = js_all * sw[:, :, None]
    h_ss = jax.ops.segment_sum(jnp.einsum("nda,ndb->nab", js, js), star, n_stars)
    b_s = -jax.ops.segment_sum(jnp.einsum("nda,nd->na", js, r), star, n_stars)
    rp = jp = None
    if terms.rp is not None:
        spw = jnp.sqrt(star_weights)[:, None]
        rp, jp = terms.rp * spw, terms.jp * spw[:, :, None] * star_mask[:, None, :]
        chi2 = chi2 + jnp.sum(rp**2)
        h_ss = h_ss + jnp.einsum("sda,sdb->sab", jp, jp)
        b_s = b_s - jnp.einsum("sda,sd->sa", jp, rp)
    h_ss = h_ss + jax.vmap(jnp.diag)(1.0 - star_mask)  # fixed star parameters: identity rows
    return Linearised(r, jm, js, chi2, h_ss, b_s, r_all, js_all, rp, jp)


def linearise(residual_fn, prior_fn, mapping, stars, data, star_data, system: System,
              weights, star_weights, mapping_mask, star_mask, mapping_jacobian: bool = True) -> Linearised:
    """`linear_terms` then `weigh`: the weighted linear problem at the current parameters."""
    terms = linear_terms(residual_fn, prior_fn, mapping, stars, data, star_data, system.index, mapping_jacobian)
    return weigh(terms, system, weights, star_weights, mapping_mask, star_mask, mapping_jacobian)


def _whitened_star_rows(lin: Linearised, l_s: jax.Array, star: jax.Array) -> jax.Array:
    """L_s^-1 J_s^T per measurement (n, q, d): the fill is sum over stars of G G^T, with
    G = L_s^-1 J_s^T J_m summed over the star's measurements (`_subtract_fill`)."""
    return small.solve_lower(l_s[star], lin.js.transpose(0, 2, 1))


def solve_step(layout: ParameterLayout, fit_mapping: bool, fit_stars: bool, terms: Terms, system: System,
               weights: jax.Array, star_weights: jax.Array, mapping_mask: jax.Array, star_mask: jax.Array,
               damping: jax.Array = 0.0, preconditioner: Preconditioner | None = None,
               precondition: bool = False, cg_tolerance: float = 1e-10, cg_iterations: int = 30) -> Step:
    """One Gauss-Newton step (minimising 0.5 |r|^2) from `linear_terms` (with `jm` when
    `fit_mapping`), which the solver runs as a separate program: every kind of step and the
    outlier scoring share that linearisation, the costliest program to compile.

    weights (n,) and star_weights (S,) are 0 for rejected outliers, 1 otherwise (shapes never
    change, so nothing recompiles). mapping_mask (N,) and star_mask (S, q) are 1 for free
    parameters and 0 for fixed ones (gauge, fitting stage). `damping` adds a multiple of the identity to the Jacobi-scaled reduced system (Levenberg),
    for near-singular systems only. The step also returns that scaled reduced matrix
    (undamped): it names degeneracies and gives the mapping covariance without compiling a
    second program.

    With a `preconditioner` (and stars fitted) the reduced system is solved by preconditioned
    conjugate gradients to a relative residual of `cg_tolerance` within `cg_iterations` (then
    `cholesky_ok` says whether it got there): the fill is never formed, and no matrix is returned.
    With `precondition` (and no `preconditioner`), the step makes its own: the reduced matrix
    with its fill in float32, factored; it is returned (`factor`) for later steps to reuse.
    """
    n_map = layout.size
    lin = weigh(terms, system, weights, star_weights, mapping_mask, star_mask, fit_mapping and n_map > 0)
    star = system.index["star"]
    l_s = _star_cholesky(lin.h_ss)

    if not fit_mapping or n_map == 0:
        ds = small.cho_solve(l_s, lin.b_s) * star_mask  # stars alone: H_ss^-1 b_s
        return Step(jnp.zeros(n_map), ds, lin.chi2, jnp.zeros(n_map), jnp.all(jnp.isfinite(ds)),
                    jnp.sum(lin.b_s * ds))

    b_gradient = _scatter_columns(system, lin.jm, -lin.r, n_map)  # -J_m^T r
    if precondition and preconditioner is None and fit_stars:
        h = assemble_reduced(layout, system, lin.jm, _whitened_star_rows(lin, l_s, star),
                             jnp.float32) + jnp.diag(1.0 - mapping_mask)
        preconditioner = Preconditioner.of_matrix(h)
    if preconditioner is not None and fit_stars:
        dm, ds, iterations, ok = _schur_cg(system, lin, l_s, b_gradient, lin.b_s, mapping_mask, preconditioner,
                                           cg_tolerance, cg_iterations)
        diag, scaled = 1.0 / preconditioner.scale**2, None
        factor = preconditioner.factor if precondition else None
    else:
        ws = _whitened_star_rows(lin, l_s, star) if fit_stars else None
        dm, ds, diag, ok, scaled, factor = _schur_solve(layout, system, lin, l_s, ws, b_gradient, lin.b_s,
                                                        mapping_mask, damping)
        iterations = 0
    dm, ds = dm * mapping_mask, ds * star_mask
    # for Gauss-Newton, |J delta|^2 = b^T delta is the decrease a linear model predicts
    predicted = jnp.dot(b_gradient, dm) + jnp.sum(lin.b_s * ds)
    return Step(dm, ds, lin.chi2, diag, ok, predicted, scaled, factor, iterations)


def _scatter_columns(system: System, jm: jax.Array, w: jax.Array, n_map: int) -> jax.Array:
    """J_m^T w: (N,) from per-measurement (n, d) vectors."""
    return jnp.zeros(n_map).at[system.columns].add(jnp.einsum("ndp,nd->np", jm, w))


def _reduced_product(system: System, lin: Linearised, l_s: jax.Array, mapping_mask: jax.Array,
                     v: jax.Array) -> jax.Array:
    """(H_mm - H_ms H_ss^-1 H_sm) v, fixed parameters as identity rows, without forming the
    matrix: J_m^T (I - J_s H_ss^-1 J_s^T) J_m v, two passes over the (n, d, P) blocks."""
    star = system.index["star"]
    u = jnp.einsum("ndp,np->nd", lin.jm, v[system.columns])
    t = jax.ops.segment_sum(jnp.einsum("ndq,nd->nq", lin.js, u), star, l_s.shape[0])
    u = u - jnp.einsum("ndq,nq->nd", lin.js, small.cho_solve(l_s, t)[star])
    return _scatter_columns(system, lin.jm, u, v.shape[0]) + (1.0 - mapping_mask) * v


def _schur_cg(system: System, lin: Linearised, l_s, b_m, b_s, mapping_mask, preconditioner: Preconditioner,
              tolerance: float, max_iterations: int):
    """`_schur_solve` with the reduced system solved by preconditioned conjugate gradients, in
    the preconditioner's Jacobi scaling. Returns (x_m, x_s, iterations, converged)."""
    b = _reduce_rhs(system, lin, l_s, b_m, b_s)
    d = preconditioner.scale
    apply = lambda z: d * _reduced_product(system, lin, l_s, mapping_mask, d * z)  # noqa: E731
    precondition = lambda r: cho_solve((preconditioner.factor, True), r)  # noqa: E731
    rhs = d * b
    goal = (tolerance * jnp.linalg.norm(rhs)) ** 2

    def iterate(state):
        k, z, r, p, rz = state
        ap = apply(p)
        alpha = rz / jnp.dot(p, ap)
        z, r = z + alpha * p, r - alpha * ap
        s = precondition(r)
        rz_new = jnp.dot(r, s)
        return k + 1, z, r, s + (rz_new / rz) * p, rz_new

    z0 = precondition(rhs)
    r0 = rhs - apply(z0)
    s0 = precondition(r0)
    k, z, r, _, _ = jax.lax.while_loop(lambda st: (st[0] < max_iterations) & (jnp.dot(st[2], st[2]) > goal),
                                       iterate, (0, z0, r0, s0, jnp.dot(r0, s0)))
    x_m = d * z
    ok = (jnp.dot(r, r) <= goal) & jnp.all(jnp.isfinite(x_m))
    return x_m, _back_substitute(system, lin, l_s, b_s, x_m), k, ok


def _reduce_rhs(system: System, lin: Linearised, l_s, b_m, b_s) -> jax.Array:
    """b_m - H_ms H_ss^-1 b_s: the right-hand side of the reduced system."""
    y_s = small.cho_solve(l_s, b_s)
    return b_m - _scatter_columns(system, lin.jm, jnp.einsum("ndq,nq->nd", lin.js, y_s[system.index["star"]]),
                                  b_m.shape[0])


def _back_substitute(system: System, lin: Linearised, l_s, b_s, x_m) -> jax.Array:
    """x_s = H_ss^-1 (b_s - H_sm x_m): the stars, given the mapping."""
    star = system.index["star"]
    u = jnp.einsum("ndp,np->nd", lin.jm, x_m[system.columns])
    return small.cho_solve(l_s, b_s - jax.ops.segment_sum(jnp.einsum("ndq,nd->nq", lin.js, u), star, b_s.shape[0]))


def _schur_solve(layout: ParameterLayout, system: System, lin: Linearised, l_s, ws, b_m, b_s, mapping_mask,
                 damping=0.0):
    """Solve [H_mm H_ms; H_sm H_ss] [x_m; x_s] = [b_m; b_s] by eliminating the stars.

    ws: `_whitened_star_rows` (None when the stars are held fixed: then x_s = 0).
    Returns (x_m, x_s, diagonal of the reduced matrix, Cholesky ok, Jacobi-scaled reduced matrix,
    its Cholesky factor).
    """
    if ws is not None:
        b_m = _reduce_rhs(system, lin, l_s, b_m, b_s)
    h = assemble_reduced(layout, system, lin.jm, ws) + jnp.diag(1.0 - mapping_mask)
    diag = jnp.diagonal(h)
    # Jacobi scaling keeps Cholesky accurate when parameter scales differ by many decades
    d = _jacobi_scale(diag)
    scaled = h * d[:, None] * d[None, :]
    factor = jnp.linalg.cholesky(scaled + damping * jnp.eye(layout.size))
    x_m = d * cho_solve((factor, True), b_m * d)
    ok = jnp.all(jnp.isfinite(factor))
    if ws is None:
        return x_m, jnp.zeros_like(b_s), diag, ok, scaled, factor
    return x_m, _back_substitute(system, lin, l_s, b_s, x_m), diag, ok, scaled, factor
