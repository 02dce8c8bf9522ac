"""The Gauss-Newton driver: stages, line search, convergence, outlier rejection, failures.

`StructuredProblem` is what a fit (astrometric or photometric) hands the solver: a
residual function per measurement, an optional prior per star (reference catalog), the
mapping model and the stars as equinox modules, the per-measurement data and group
indices. `Solver` precomputes the layout once (host), then runs jitted steps whose shapes
never change: outliers get weight 0 and fixed parameters mask 0 instead of being removed.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
from scipy import special, stats

from jcal_models import parameter_filter

from .compile import brief_jit
from .layout import BlockGroups, ParameterLayout, Tiles, bucket, choose_tile_classes, fill_flops, rank_in_groups
from .peeling import StarTerms, peel
from .normal_equations import (Preconditioner, System, TileSet, chi2_terms, implicit_cotangents, leave_one_out_chi2,
                               linear_terms, measurement_terms, solve_step)

log = logging.getLogger("jcal.solver")


CG_ABOVE_FLOPS = 50e9  # fill work per step above which joint steps reuse an earlier factor
CG_ITERATIONS = 30  # conjugate-gradient iterations before a joint step assembles its matrix instead
# Fill work per step below which the linearisation and the joint step, too, compile for compile
# speed (`compile.brief_jit`): their runs are then short next to their compilation (medium
# photometry, 1.4 GFlop: ~0.8 s less per fit, runs ~0.2 s longer).
BRIEF_BELOW_FLOPS = 5e9
# Before the first joint step, measurements are rejected at GROSS_FACTOR times the n-sigma cut,
# reference terms at GROSS_REFERENCE_FACTOR times it (`Solver.reject_gross`).
GROSS_FACTOR = 3.0
GROSS_REFERENCE_FACTOR = 10.0
STARS_ONLY_BELOW = 1e-3  # outlier rounds rejecting fewer than this fraction of the terms refit only the stars


class FitError(RuntimeError):
    """The fit cannot go on (non-finite chi2, singular system, exploding chi2)."""


class SingularSystemError(FitError):
    """The normal equations are singular; `parameters` names the unconstrained ones."""

    def __init__(self, message: str, parameters: list[str]):
        super().__init__(message)
        self.parameters = parameters


@dataclass
class StructuredProblem:
    residual_fn: Callable  # (model_view, star_view, datum) -> (d,) whitened residual
    prior_fn: Callable | None  # (star_view, star_datum) -> (k,) whitened residual, or None
    mapping: Any  # eqx.Module, full (leaves with group axes)
    stars: Any  # eqx.Module, leaves with a leading star axis
    data: dict[str, np.ndarray]  # per measurement, leading axis n
    star_data: dict[str, np.ndarray] | None  # per star, leading axis S
    index: dict[str, np.ndarray]  # group key -> (n,) int; must include "star"
    star_xyz: np.ndarray  # (S, 3) unit vectors, to tile the stars spatially
    prior_dof: np.ndarray | None = None  # (S,) number of active prior components per star
    prior_rejectable: np.ndarray | None = None  # (S,) bool: prior is data (a catalog), may be an outlier
    mapping_filter: Any = None  # bool pytree: fitted leaves (default: parameter_filter)
    stars_per_tile: int = 64  # measured (benchmarks, medium/large): 1.3x faster steps than 128, as fast as 32
    # Tiles are padded per class of similar width (`Tiles.split`); each class compiles its own
    # fill. None: as few classes as pad the fill little (`layout.choose_tile_classes`).
    tile_classes: int | None = None
    # Joint steps after the first solve the reduced system by conjugate gradients preconditioned
    # by the last assembled one (`normal_equations.Preconditioner`). None: when the fill costs
    # more than `CG_ABOVE_FLOPS` per step.
    reuse_factor: bool | None = None


@dataclass
class FitState:
    mapping: Any
    stars: Any
    weights: np.ndarray  # (n,) 1 = used, 0 = rejected outlier
    star_weights: np.ndarray  # (S,) prior (reference) used
    history: list[dict] = field(default_factory=list)  # one entry per step
    converged: bool = True
    n_outliers: int = 0
    n_reference_outliers: int = 0
    unusable: np.ndarray | None = None  # (n,) weight 0 from the start (e.g. no flux): never re-admitted


# A step runs as two programs, `linear_terms` then `solve_step`: the linearisation (autodiff
# of the model, the costliest program to compile and to run) is shared by every kind of step
# and by the outlier scoring, is computed once per point (a scoring round and the stars-only
# refit after it reuse it), and a damped retry re-solves without linearising again.
_terms = jax.jit(linear_terms, static_argnames=("residual_fn", "prior_fn", "mapping_jacobian"))
_terms_brief = brief_jit(linear_terms, static_argnames=("residual_fn", "prior_fn", "mapping_jacobian"))
# The joint step is costly to run (except on small problems, `BRIEF_BELOW_FLOPS`); the others
# are cheap and compile for compile speed.
_solve_joint = jax.jit(solve_step, static_argnames=("layout", "fit_mapping", "fit_stars"))
_solve_brief = brief_jit(solve_step, static_argnames=("layout", "fit_mapping", "fit_stars"))
_solve_cg = jax.jit(solve_step, static_argnames=("layout", "fit_mapping", "fit_stars", "precondition",
                                                 "cg_iterations"))
_chi2 = brief_jit(chi2_terms)
_deleted_chi2 = brief_jit(leave_one_out_chi2)
_implicit = jax.jit(implicit_cotangents, static_argnums=(0, 1, 2))


def flatten_stars(stars_params) -> jax.Array:
    leaves = jax.tree.leaves(stars_params)
    return jnp.concatenate([a.reshape(a.shape[0], -1) for a in leaves], axis=1)


def unflatten_stars(flat, stars_params):
    leaves, treedef = jax.tree.flatten(stars_params)
    out, start = [], 0
    for a in leaves:
        width = int(np.prod(a.shape[1:]))
        out.append(flat[:, start:start + width].reshape(a.shape))
        start += width
    return jax.tree.unflatten(treedef, out)


class Solver:
    """Host-side driver around the jitted step, for one problem structure."""

    def __init__(self, problem: StructuredProblem):
        # Measurements and stars are padded to bucketed sizes (weight 0, parameters fixed), so
        # that a second survey of similar size reuses the compiled step.
        self.n_real, self.stars_real = len(problem.index["star"]), int(problem.star_xyz.shape[0])
        n, s = bucket(self.n_real), bucket(self.stars_real)
        problem = _padded(problem, n, s)
        self.problem = problem
        filt = problem.mapping_filter if problem.mapping_filter is not None else parameter_filter(problem.mapping)
        self.mapping_filter = filt
        pm, _ = eqx.partition(problem.mapping, filt)
        self.layout = ParameterLayout.of(pm, problem.mapping)
        self.star_filter = parameter_filter(problem.stars)
        groups = self.layout.group_index(problem.index, n)
        # padding measurements (weight 0, zero Jacobian rows) belong to no block and no tile
        real = slice(0, self.n_real)
        blocks = BlockGroups.of(groups[real])
        tiles = Tiles.of(np.asarray(problem.index["star"])[real], problem.star_xyz, groups[real],
                         problem.stars_per_tile)
        star_params = int(flatten_stars(eqx.filter(problem.stars, self.star_filter)).shape[1])
        tile_classes = (tiles.split(self.layout.row_sizes, problem.tile_classes) if problem.tile_classes
                        else choose_tile_classes(tiles, self.layout.row_sizes, star_params))
        self.system = System(
            index={k: jnp.asarray(v) for k, v in problem.index.items()},
            columns=jnp.asarray(self.layout.columns(groups)),
            block_members=jnp.asarray(blocks.members),
            block_groups=jnp.asarray(blocks.groups),
            tiles=tuple(TileSet(jnp.asarray(t.stars), jnp.asarray(t.measurements), jnp.asarray(t.star_local),
                                tuple(jnp.asarray(s) for s in t.slots), tuple(jnp.asarray(g) for g in t.groups))
                        for t in tile_classes),
        )
        fill = fill_flops(tile_classes, self.layout.row_sizes, star_params)
        self.reuse_factor = problem.reuse_factor if problem.reuse_factor is not None else fill > CG_ABOVE_FLOPS
        self.brief = fill < BRIEF_BELOW_FLOPS
        self._preconditioner: Preconditioner | None = None  # from the last assembled joint step
        self._residual_dim: int | None = None
        self.data = jax.tree.map(jnp.asarray, problem.data)
        self.star_data = None if problem.star_data is None else jax.tree.map(jnp.asarray, problem.star_data)
        self.n_measurements = n  # padded sizes, as the device arrays have them
        self.n_stars = s
        self.sizes = {
            "measurements": self.n_real, "stars": self.stars_real, "mapping_parameters": self.layout.size,
            "star_parameters": star_params * self.stars_real,
            "padded_measurements": n, "padded_stars": s,
            "block_groups": int(blocks.members.shape[0]), "tiles": int(tiles.measurements.shape[0]),
            "tile_width": int(tiles.measurements.shape[1]),
            "tile_columns": [t.columns(self.layout.row_sizes) for t in tile_classes],
            "fill_gflop": round(fill / 1e9, 1),
        }

    # -- padding ---------------------------------------------------------------------------------
    def pad_measurements(self, values: np.ndarray, fill: float = 0.0) -> np.ndarray:
        return _pad_rows(np.asarray(values), self.n_measurements, fill)

    def pad_stars(self, values: np.ndarray, fill: float = 0.0) -> np.ndarray:
        return _pad_rows(np.asarray(values), self.n_stars, fill)

    def new_state(self, mapping, stars, weights, star_weights) -> FitState:
        """A state from real-size stars and weights (padding gets weight 0)."""
        weights = self.pad_measurements(weights)
        return FitState(mapping, _pad_tree(stars, self.n_stars), weights, self.pad_stars(star_weights),
                        unusable=weights == 0)

    def real_stars(self, stars):
        return jax.tree.map(lambda a: a[: self.stars_real], stars)

    def set_data(self, name: str, values) -> None:
        """Replace one per-measurement data array (real size), e.g. refreshed error weights."""
        self.data = dict(self.data, **{name: jnp.asarray(_pad_rows(np.asarray(values), self.n_measurements))})

    # -- parameter vectors ---------------------------------------------------------------------
    def split(self, mapping, stars):
        return eqx.partition(mapping, self.mapping_filter), eqx.partition(stars, self.star_filter)

    def mapping_mask(self, mask_tree=None) -> np.ndarray:
        """(N,) 1 for free mapping parameters; `mask_tree` like the fitted leaves, 0/1 arrays.
        Host arrays, as the other masks: eager device operations would each compile."""
        if mask_tree is None:
            return np.ones(self.layout.size)
        leaves = jax.tree.leaves(mask_tree)
        return np.concatenate([np.ravel(np.asarray(a, np.float64)) for a in leaves]) if leaves else np.zeros(0)

    def parameter_names(self) -> list[str]:
        """Readable name of every flat mapping parameter."""
        pm, _ = eqx.partition(self.problem.mapping, self.mapping_filter)
        names = []
        for (path, leaf), key, g, p in zip(jax.tree_util.tree_flatten_with_path(pm)[0], self.layout.keys,
                                           self.layout.n_groups, self.layout.row_sizes):
            label = jax.tree_util.keystr(path)
            for gi in range(g):
                for e in range(p):
                    names.append(f"{label}[{key} {gi}, element {e}]")
        return names

    # -- fitting ---------------------------------------------------------------------------------
    def chi2(self, state: FitState) -> tuple[np.ndarray, np.ndarray]:
        """(n,) measurement and (S,) prior chi2 contributions (real sizes)."""
        c_m, c_s = self._chi2(state)
        return c_m[: self.n_real], c_s[: self.stars_real]

    def _chi2(self, state: FitState) -> tuple[np.ndarray, np.ndarray]:
        c_m, c_s = _chi2(self._linear_terms(state, False), jnp.asarray(state.weights),
                         jnp.asarray(state.star_weights))
        return np.asarray(c_m), np.asarray(c_s)

    def _effective_star_mask(self, state: FitState, star_mask) -> np.ndarray:
        """Stars with no unrejected measurement and no prior have nothing to fit: fix them."""
        star_mask = _pad_rows(np.asarray(star_mask, np.float64), self.n_stars, 0.0)
        active = np.bincount(np.asarray(self.problem.index["star"]), weights=state.weights,
                             minlength=self.n_stars)
        if self.problem.prior_dof is not None:
            active = active + state.star_weights * (self.problem.prior_dof > 0)
        return star_mask * (active > 0)[:, None]

    def run_stage(self, state: FitState, name: str, *, fit_mapping: bool, fit_stars: bool,
                  mapping_mask: jax.Array, star_mask, max_iterations: int, tolerance: float,
                  line_search: bool = True) -> FitState:
        """Gauss-Newton iterations until chi2 changes by less than `tolerance` (relative)."""
        smask = self._effective_star_mask(state, star_mask)
        if not fit_stars:
            smask = np.zeros_like(smask)
        mmask = mapping_mask if fit_mapping else np.zeros(self.layout.size)
        weights, star_weights = jnp.asarray(state.weights), jnp.asarray(state.star_weights)
        converged = False
        for iteration in range(max_iterations):
            t0 = time.perf_counter()
            (pm, sm), (ps, ss) = self.split(state.mapping, state.stars)
            terms = self._linear_terms(state, fit_mapping)
            # Levenberg damping only when the undamped reduced system is numerically singular
            for damping in (0.0, 1e-10, 1e-8, 1e-6):
                step = self._solve(terms, fit_mapping, fit_stars, weights, star_weights, mmask, smask, damping)
                chi2_old = float(step.chi2)
                if not math.isfinite(chi2_old):
                    raise FitError(f"stage {name!r}: chi2 is not finite ({chi2_old}) at iteration {iteration}; "
                                   "check the input for non-finite values or a first-guess WCS far off")
                if bool(step.cholesky_ok) and np.all(np.isfinite(np.asarray(step.delta_mapping))):
                    break
                if damping == 0.0:  # structurally degenerate (null space) or merely ill-conditioned?
                    error = self._singular(name, step, mmask)
                    if error.parameters:
                        raise error
            else:
                raise self._singular(name, step, mmask)
            if damping:
                log.warning("stage %s: near-singular normal equations, damped by %g", name, damping)
            alpha, chi2_new, trial = 1.0, math.inf, state
            for _ in range(12 if line_search else 1):
                trial = self._apply(state, pm, ps, step, alpha, fit_mapping)
                c_m, c_s = self._chi2(trial)
                chi2_new = float(c_m.sum() + c_s.sum())
                if chi2_new <= chi2_old * (1 + 1e-12) or not line_search:
                    break
                alpha /= 2
            if not math.isfinite(chi2_new):
                raise FitError(f"stage {name!r}: chi2 exploded to {chi2_new} at iteration {iteration}")
            state.history.append({"stage": name, "iteration": iteration, "chi2": min(chi2_new, chi2_old),
                                  "step_fraction": alpha, "cg_iterations": int(step.iterations),
                                  "seconds": time.perf_counter() - t0})
            if chi2_new > chi2_old:  # no descent even for tiny steps: at the minimum
                converged = True
                break
            state.mapping, state.stars = trial.mapping, trial.stars
            log.debug("stage %s it %d chi2 %.6g -> %.6g (step %.3g)", name, iteration, chi2_old, chi2_new, alpha)
            # converged when the step gained little, or when the linear model predicted the full
            # step's gain exactly (the next step could only gain about that mismatch)
            gain, predicted = chi2_old - chi2_new, float(step.predicted_decrease)
            if gain <= tolerance * max(chi2_new, 1e-300) or (
                    alpha == 1.0 and abs(gain - predicted) <= tolerance * max(chi2_new, 1e-300)):
                converged = True
                break
        if not converged:
            log.warning("stage %s: not converged after %d iterations", name, max_iterations)
            state.converged = False
        return state

    def _linear_terms(self, state: FitState, mapping_jacobian: bool):
        """`linear_terms` at `state`, with the mapping Jacobian if asked. The last result is kept:
        a scoring round and the stars-only refit after it linearise at the same point."""
        mapping_jacobian = bool(mapping_jacobian and self.layout.size)
        key = (state.mapping, state.stars, self.data)
        cached = getattr(self, "_last_terms", None)
        if cached is not None and all(a is b for a, b in zip(cached[0], key)) and (
                cached[1].jm is not None or not mapping_jacobian):
            # without the mapping Jacobian when not asked: the programs taking it compile once
            return cached[1] if mapping_jacobian else cached[1]._replace(jm=None)
        self._last_terms = None  # frees its device memory before the new one is made
        (pm, sm), (ps, ss) = self.split(state.mapping, state.stars)
        linearise = _terms_brief if self.brief else _terms
        terms = linearise(residual_fn=self.problem.residual_fn, prior_fn=self.problem.prior_fn, mapping=(pm, sm),
                       stars=(ps, ss), data=self.data, star_data=self.star_data, index=self.system.index,
                       mapping_jacobian=mapping_jacobian)
        self._last_terms = (key, terms)
        self._residual_dim = int(terms.r.shape[1])
        return terms

    def _solve(self, terms, fit_mapping: bool, fit_stars: bool, weights, star_weights, mmask, smask,
               damping: float = 0.0, direct: bool = False):
        """One step from `terms`. With `reuse_factor` (undamped, not `direct`), a joint step solves
        by conjugate gradients, preconditioned by the factor of an earlier step's reduced matrix,
        or for the first one by its own with the fill in float32 (half the work), kept for the
        next; if they do not converge, the step assembles the exact matrix (and keeps its factor)."""
        joint = fit_mapping and fit_stars and self.layout.size > 0
        args = (jnp.asarray(weights), jnp.asarray(star_weights), mmask, smask, damping)
        if joint and self.reuse_factor and not direct and damping == 0.0:
            fresh = self._preconditioner is None  # then the step assembles one, and needs the tiles
            step = _solve_cg(self.layout, True, True, terms, self._system_for(True, fresh), *args,
                             preconditioner=self._preconditioner, precondition=fresh, cg_iterations=CG_ITERATIONS)
            if bool(step.cholesky_ok):
                if fresh:
                    self._preconditioner = Preconditioner.of(step)
                return step
            log.debug("conjugate gradients short of convergence after %d iterations: assembling the reduced "
                      "matrix", int(step.iterations))
        solve = _solve_joint if fit_mapping and fit_stars and not self.brief else _solve_brief
        step = solve(self.layout, fit_mapping, fit_stars, terms, self._system_for(fit_mapping, fit_stars), *args)
        if joint and self.reuse_factor and damping == 0.0 and bool(step.cholesky_ok):
            self._preconditioner = Preconditioner.of(step)
        return step

    def _apply(self, state: FitState, pm, ps, step, alpha: float, move_mapping: bool = True) -> FitState:
        """The state moved by alpha times the step (the mapping object kept when it does not move)."""
        move_mapping = bool(move_mapping and self.layout.size)
        new_pm, new_ps = _moved(self.layout, move_mapping, pm, ps, step.delta_mapping, step.delta_stars, alpha)
        if move_mapping:
            mapping = eqx.combine(new_pm, eqx.filter(state.mapping, self.mapping_filter, inverse=True))
        else:
            mapping = state.mapping
        stars = eqx.combine(new_ps, eqx.filter(state.stars, self.star_filter, inverse=True))
        return dataclasses.replace(state, mapping=mapping, stars=stars)

    def _singular(self, name: str, step, mmask) -> SingularSystemError:
        """Name what makes the reduced system singular: parameters with no information, groups
        with fewer residuals than parameters, and (given `step.scaled_matrix`) the parameters
        spanning its null space. An error with no `parameters` means: ill-conditioned only."""
        diag = np.asarray(step.reduced_diagonal)
        free = np.asarray(mmask) > 0
        scale = np.median(diag[free]) if free.any() else 1.0
        weak = np.flatnonzero(free & (diag <= 1e-10 * scale))
        names = self.parameter_names()
        named = [names[i] for i in weak[:20]]
        # groups with fewer residuals than parameters cannot be determined whatever the data
        starved = []
        for key, n_groups, p in zip(self.layout.keys, self.layout.n_groups, self.layout.row_sizes):
            if key in self.problem.index:
                counts = np.bincount(self.problem.index[key], minlength=n_groups) * self.residual_dim
                starved += [f"{key} {g} ({counts[g]} residuals for {p} parameters)"
                            for g in np.flatnonzero(counts < p)[:10]]
        null = []
        if step.scaled_matrix is not None and not named and not starved:
            h = np.asarray(step.scaled_matrix)[np.ix_(free, free)]
            values, vectors = np.linalg.eigh(h)
            small = values < 1e-10 * max(values[-1], 1e-300)
            if small.any():  # exact degeneracy: name the parameters that move along it
                weight = np.abs(vectors[:, small]).max(axis=1)
                null = [names[i] for i in np.flatnonzero(free)[np.argsort(-weight)[:10]]]
                null = [f"{int(small.sum())} degenerate direction(s) involving " + ", ".join(null[:5])]
        return SingularSystemError(
            f"stage {name!r}: the normal equations are singular; {len(weak)} mapping parameter(s) have no "
            f"constraint (e.g. {named[:5]}); under-determined groups: {starved or 'none found'}; "
            f"{null[0] if null else 'no exact null space found'}. Fix the gauge (see the model form's "
            "fix_gauge), lower the polynomial order, add data, or freeze parameters.", named + starved + null)

    # -- outliers and statistics -----------------------------------------------------------------
    def ndof(self, state: FitState, mapping_mask, star_mask) -> int:
        n_res = self.residual_dim * float(np.sum(state.weights))
        if self.problem.prior_dof is not None:
            n_res += float(np.sum(state.star_weights * self.problem.prior_dof))
        smask = np.asarray(self._effective_star_mask(state, star_mask))
        return int(round(n_res - float(np.sum(np.asarray(mapping_mask))) - float(smask.sum())))

    @property
    def residual_dim(self) -> int:
        """d: residual components per measurement (2 astrometry, 1 photometry), as the last
        linearisation had them (before any, the residual is traced for its shape: ~0.1 s)."""
        if self._residual_dim is None:
            (pm, sm), (ps, ss) = self.split(self.problem.mapping, self.problem.stars)
            first = jax.tree.map(lambda a: a[:1], self.data)
            idx = {k: v[:1] for k, v in self.system.index.items()}
            shape = jax.eval_shape(lambda: measurement_terms(self.problem.residual_fn, (pm, sm), (ps, ss), first,
                                                             idx, with_jacobian=False))
            self._residual_dim = int(shape.shape[1])
        return self._residual_dim

    def reject_outliers(self, state: FitState, n_sigma: float, star_mask,
                        min_measurements: int = 2, reference_sigma: float | None = None,
                        judged: np.ndarray | None = None, peel: bool = True) -> tuple[int, int]:
        """Reject, per star, the worst measurement or reference term beyond n_sigma.

        Terms are scored by their leave-one-out chi2 (see `leave_one_out_chi2`) against the
        chi2 quantile (residual dimension d) with the two-sided Gaussian tail probability of
        n_sigma, scaled by a robust estimate of how much the errors are underestimated (the
        median deleted chi2 over its expected median, when above 1): the outliers themselves
        do not inflate the cut, so one round catches nearly all of them. Terms of one star
        interact through it (stars do not), so one term per star goes per round; but in a round
        that rejects few terms (the mapping no longer biased by gross outliers), a star that
        lost one is refitted alone and rescored, and peeled again while a term is beyond the
        cut (`peeling.peel`), which saves a round per further term. A star left with fewer than
        `min_measurements` loses the rest too. `reference_sigma` (default n_sigma) is the cut of
        reference terms; `judged` (S,) bool the stars whose terms are judged (default all);
        without `peel`, nothing is peeled.
        """
        smask = self._effective_star_mask(state, star_mask)
        d_m, d_s, _ = self._leave_one_out(state, smask)
        d_m, d_s = np.asarray(d_m), np.asarray(d_s)
        star = np.asarray(self.problem.index["star"])
        used = state.weights > 0
        tail, scale = self._tail_and_scale(n_sigma, d_m, used)
        cut_m = stats.chi2.isf(tail, self.residual_dim) * scale
        judged = np.ones(self.n_stars, bool) if judged is None else np.asarray(judged, bool)
        score_m = np.where(used & judged[star], d_m / cut_m, 0.0)
        score_s, cut_s = np.zeros(self.n_stars), np.ones(self.n_stars)
        rejectable = np.ones(self.n_stars, bool) if self.problem.prior_rejectable is None \
            else np.asarray(self.problem.prior_rejectable, bool)  # a prior that is not data stays
        if self.problem.prior_dof is not None:
            dof, which = self._prior_dof_levels
            reference_tail = tail if reference_sigma is None else float(special.erfc(reference_sigma / np.sqrt(2.0)))
            cut_s = stats.chi2.isf(reference_tail, dof)[which] * scale  # per distinct dof: isf is slow
            score_s = np.where((state.star_weights > 0) & rejectable & judged, d_s / cut_s, 0.0)
        worst = score_s.copy()
        np.maximum.at(worst, star, score_m)
        candidates = np.flatnonzero((score_m > 1) & (score_m >= worst[star]))
        _, first = np.unique(star[candidates], return_index=True)  # one per star
        reject_m = np.zeros(len(star), bool)
        reject_m[candidates[first]] = True
        has_rejected = np.zeros(self.n_stars, bool)
        has_rejected[star[reject_m]] = True
        reject_s = (score_s > 1) & (score_s >= worst) & ~has_rejected
        if peel and self._few(int(reject_m.sum() + reject_s.sum()), state):
            # few rejections: the mapping is clean, a star's other terms can be judged now
            self._peel(state, smask, reject_m, reject_s, cut_m, cut_s, rejectable, min_measurements)
        has_rejected[star[reject_m]] = True
        weights = np.where(reject_m, 0.0, state.weights)
        # a star left with too few measurements cannot tell which of them was wrong: drop it
        left = np.bincount(star, weights=weights, minlength=self.n_stars)
        orphaned = (left < min_measurements) & (left > 0) & has_rejected
        reject_m |= orphaned[star] & (weights > 0)
        state.weights = np.where(reject_m, 0.0, state.weights)
        state.star_weights = np.where(reject_s, 0.0, state.star_weights)
        return int(reject_m.sum()), int(reject_s.sum())

    @staticmethod
    def _few(n_rejected: int, state: FitState) -> bool:
        """A round rejecting at most `STARS_ONLY_BELOW` of the terms in use: the mapping is no
        longer biased by gross outliers (its stars alone are refitted, and peeled)."""
        return n_rejected <= STARS_ONLY_BELOW * float(np.sum(state.weights) + np.sum(state.star_weights))

    def _peel(self, state: FitState, smask, reject_m: np.ndarray, reject_s: np.ndarray, cut_m: float,
              cut_s: np.ndarray, rejectable: np.ndarray, min_measurements: int) -> None:
        """Extend this round's rejections (`reject_m`, `reject_s`, updated in place) by peeling
        the stars that lost a term (`peeling.peel`), from the terms the scoring linearised."""
        star = np.asarray(self.problem.index["star"])
        hit = np.zeros(self.n_stars, bool)
        hit[star[reject_m]] = True
        hit |= reject_s
        if not hit.any():
            return
        stars = np.flatnonzero(hit)
        rows = np.flatnonzero(hit[star] & (state.weights > 0))
        rows = rows[np.argsort(star[rows], kind="stable")]
        slot_star = np.searchsorted(stars, star[rows])
        counts = np.bincount(slot_star, minlength=len(stars))
        slot = rank_in_groups(counts)
        shape = (len(stars), int(counts.max()))

        terms = self._linear_terms(state, False)  # the scoring's, at this state
        smask = np.asarray(smask)
        r_rows, j_rows = _host_rows((terms.r, terms.js), rows)
        j_rows = j_rows * smask[star[rows]][:, None, :]
        r = np.zeros(shape + r_rows.shape[1:])
        j = np.zeros(shape + j_rows.shape[1:])
        alive = np.zeros(shape, bool)
        r[slot_star, slot], j[slot_star, slot], alive[slot_star, slot] = r_rows, j_rows, ~reject_m[rows]
        q = j.shape[-1]
        in_fit = state.star_weights[stars] > 0
        if terms.rp is not None:
            rp, jp = _host_rows((terms.rp, terms.jp), stars)
            jp = jp * smask[stars][:, None, :]
        else:
            rp, jp = np.zeros((len(stars), 0)), np.zeros((len(stars), 0, q))
        prior_alive = in_fit & rejectable[stars] & ~reject_s[stars]
        alive_after, prior_after = peel(StarTerms(r, j, alive, rp, jp, prior_alive, in_fit & ~rejectable[stars],
                                                  1.0 - smask[stars]), cut_m, cut_s[stars], min_measurements)
        reject_m[rows[alive[slot_star, slot] & ~alive_after[slot_star, slot]]] = True
        reject_s[stars[prior_alive & ~prior_after]] = True

    @functools.cached_property
    def _prior_dof_levels(self) -> tuple[np.ndarray, np.ndarray]:
        """Distinct prior dof values (at least 1) and each star's position among them."""
        dof, which = np.unique(np.maximum(self.problem.prior_dof, 1), return_inverse=True)
        return dof, which.ravel()

    def reject_until_clean(self, state: FitState, refit_all: Callable[[FitState], FitState],
                           refit_stars: Callable[[FitState], FitState], star_mask: Callable[[FitState], Any], *,
                           n_sigma: float, min_measurements: int, max_rounds: int, label: str) -> FitState:
        """Outlier rounds (`reject_outliers`) with refits, until a full refit leaves nothing to reject.

        After a round that rejects many terms (gross outliers bias the mapping) everything is
        refitted. After a round that rejects few (below `STARS_ONLY_BELOW` of the terms in use)
        only the stars are: a few terms among the thousands behind each mapping group barely move
        it, while their stars move fully; a stars-only step costs a fraction of a full one. Once a
        round finds nothing after a stars-only refit, everything is refitted and scored again, so
        the result is the joint optimum for its final outlier set, as with full refits only.
        The first round that rejects few or none (the mapping is clean) also re-admits rejected
        measurements that fit the solution (`readmit`), and the refit is chosen by the terms
        rejected and re-admitted together (medium astrometry: a stars-only refit and a scoring
        fewer than re-admitting only after a clean round). Only once: a second re-admission
        found a few dozen terms on large (of 0.5 M) and cost a full step and a scoring for a
        1e-5 chi2 change.
        `refit_*` run a fitting stage and return the new state; `star_mask(state)` is the
        star-parameter mask of `reject_outliers`.
        """
        fully_refit, readmitted = True, False
        # e.g. unusable fluxes: never outliers, never re-admitted
        outside_before = state.unusable if state.unusable is not None else state.weights == 0
        for _ in range(max_rounds):
            before = state.weights
            n_meas, n_ref = self.reject_outliers(state, n_sigma, star_mask(state), min_measurements)
            state.n_outliers += n_meas
            state.n_reference_outliers += n_ref
            log.info("%s: rejected %d measurement and %d reference outliers", label, n_meas, n_ref)
            n_back = 0
            if self._few(n_meas + n_ref, state) and not readmitted:
                # rejections are decided on fits still biased by the outliers not yet found; a
                # term that fits the clean solution comes back (not one this round rejected)
                readmitted = True
                n_back = self.readmit(state, n_sigma, star_mask(state), (before == 0) & ~outside_before)
                state.n_outliers -= n_back
                if n_back:
                    log.info("%s: re-admitted %d measurement(s) that fit the current solution", label, n_back)
            changed = n_meas + n_ref + n_back
            if changed == 0:
                if fully_refit:
                    return state
                state, fully_refit = refit_all(state), True
                continue
            fully_refit = not self._few(changed, state)
            state = refit_all(state) if fully_refit else refit_stars(state)
        if max_rounds:
            log.warning("%s: outlier rejection still finding outliers after %d rounds", label, max_rounds)
            state.converged = False
        return state

    def reject_gross(self, state: FitState, refit_stars: Callable[[FitState], FitState],
                     star_mask: Callable[[FitState], Any], *, n_sigma: float, min_measurements: int,
                     max_rounds: int, label: str) -> FitState:
        """Gross outliers out before the first joint step: rounds of `reject_outliers` with
        stars-only refits, while rounds reject many terms (`_few`). The mapping was fitted on
        reference stars and the stars on their measurements: gross outliers stand out, but the
        mapping is not yet good enough to judge the rest, so the cut is `GROSS_FACTOR` times
        n_sigma for measurements and `GROSS_REFERENCE_FACTOR` times for reference terms (whose
        errors are tiny next to the mapping's errors before the joint fit). Each round saves a
        joint refit in `reject_until_clean`, which follows at n_sigma (and re-admits
        measurements that fit the final solution). Measured (benchmarks/bench.py, medium):
        - none: 4 joint steps, map 0.194 mas from the truth, 967 good detections lost;
        - at n_sigma: 2 joint steps, but 1 566 good detections lost;
        - at 3 n_sigma, references too: 333 references rejected against 147 (mapping errors
          look like reference outliers before the joint fit), the map 0.239 mas from the truth;
        - as here: 3 joint steps, 827 lost, 0.181 mas (large: 2 joint steps against 4, 246 lost
          against 388, 0.241 against 0.250 mas); no injected outlier is missed.
        """
        star = np.asarray(self.problem.index["star"])
        touched = np.zeros(self.n_stars, bool)
        for _ in range(max_rounds):
            weights, star_weights = state.weights, state.star_weights
            # a star that lost a term here is judged again only while it keeps plenty: else a
            # second term beyond the cut more likely says the mapping is still off there, and
            # the joint rounds judge it (small preset: a good 3-detection star lost all three)
            in_use = np.bincount(star, weights=weights, minlength=self.n_stars)
            judged = ~touched | (in_use > min_measurements + 1)
            n_meas, n_ref = self.reject_outliers(state, GROSS_FACTOR * n_sigma, star_mask(state), min_measurements,
                                                 reference_sigma=GROSS_REFERENCE_FACTOR * n_sigma, judged=judged,
                                                 peel=False)
            state.n_outliers += n_meas
            state.n_reference_outliers += n_ref
            log.info("%s: rejected %d measurement and %d reference gross outliers", label, n_meas, n_ref)
            if n_meas + n_ref == 0:
                break
            touched[star[state.weights < weights]] = True
            touched[state.star_weights < star_weights] = True
            state = refit_stars(state)
            if self._few(n_meas + n_ref, state):
                break
        return state

    def _tail_and_scale(self, n_sigma: float, d_m: np.ndarray, used: np.ndarray) -> tuple[float, float]:
        """The Gaussian two-sided tail probability of n_sigma, and the robust error scale: the
        median leave-one-out chi2 of the used measurements over its expected median (>= 1)."""
        tail = float(special.erfc(n_sigma / np.sqrt(2.0)))
        if not used.any():
            return tail, 1.0
        return tail, max(float(np.median(d_m[used])) / stats.chi2.median(self.residual_dim), 1.0)

    def readmit(self, state: FitState, n_sigma: float, star_mask, eligible: np.ndarray) -> int:
        """Give weight 1 back to `eligible` rejected measurements whose chi2 against the current fit
        (noise plus their star's uncertainty) is within the n_sigma cut of `reject_outliers`
        (same robust scale), where their star still has measurements in the fit. Returns how many."""
        d_m, _, _ = self._leave_one_out(state, self._effective_star_mask(state, star_mask))
        d_m = np.asarray(d_m)
        tail, scale = self._tail_and_scale(n_sigma, d_m, state.weights > 0)
        star = np.asarray(self.problem.index["star"])
        fitted = np.bincount(star, weights=state.weights, minlength=self.n_stars) > 0
        back = np.zeros(self.n_measurements, bool)
        back[: self.n_real] = eligible[: self.n_real] & fitted[star[: self.n_real]]
        back &= d_m < stats.chi2.isf(tail, self.residual_dim) * scale
        state.weights = np.where(back, 1.0, state.weights)
        return int(back.sum())

    def covariance(self, state: FitState, mapping_mask, star_mask) -> np.ndarray:
        """(N, N) covariance of the mapping parameters marginalised over the stars: the inverse
        of the reduced normal matrix of a full step (fixed parameters: zero rows and columns)."""
        smask = self._effective_star_mask(state, star_mask)
        step = self._solve(self._linear_terms(state, True), True, True, state.weights, state.star_weights,
                           jnp.asarray(mapping_mask), smask, direct=True)
        diag = np.asarray(step.reduced_diagonal)
        d = 1.0 / np.sqrt(np.where(diag > 0, diag, 1.0))
        factor = scipy.linalg.cho_factor(np.asarray(step.scaled_matrix), lower=True)
        cov = d[:, None] * scipy.linalg.cho_solve(factor, np.diag(d))
        free = np.asarray(mapping_mask) > 0
        return np.where(free[:, None] & free[None, :], cov, 0.0)

    def star_covariance(self, state: FitState, star_mask) -> np.ndarray:
        """(S, q, q) covariance of each star's parameters with the mapping held at its fit
        (the conditional covariance; the mapping adds a little, see `covariance`)."""
        smask = self._effective_star_mask(state, star_mask)
        _, _, h_inv = self._leave_one_out(state, smask)
        cov = np.asarray(h_inv) * np.asarray(smask)[:, :, None] * np.asarray(smask)[:, None, :]
        return cov[: self.stars_real]

    def deleted_chi2(self, state: FitState, star_mask) -> np.ndarray:
        """(n,) each measurement's leave-one-out chi2 (`leave_one_out_chi2`): the errors of chi2,
        with its star's share of the degrees of freedom; 0 where nothing else constrains the star."""
        smask = self._effective_star_mask(state, star_mask)
        return np.asarray(self._leave_one_out(state, smask)[0])[: self.n_real]

    def _leave_one_out(self, state: FitState, smask):
        """`leave_one_out_chi2` at `state`; the last result is kept, as a clean scoring round and
        the re-admission that follows it ask for the same one."""
        inputs = (state.mapping, state.stars, self.data, np.array(state.weights), np.array(state.star_weights),
                  np.asarray(smask))
        cached = getattr(self, "_last_leave_one_out", None)
        if cached is not None and all(a is b for a, b in zip(cached[0][:3], inputs[:3])) and all(
                np.array_equal(a, b) for a, b in zip(cached[0][3:], inputs[3:])):
            return cached[1]
        result = _deleted_chi2(self._linear_terms(state, False), self._system_for(False, False),
                               jnp.asarray(state.weights), jnp.asarray(state.star_weights), smask)
        self._last_leave_one_out = (inputs, result)
        return result

    def _system_for(self, fit_mapping: bool, fit_stars: bool) -> System:
        """The structure a program needs: the fill's tiles only with both mapping and stars fitted,
        the block groups only with the mapping. Their shapes come from the data, and a program that does not take them is
        reused by any survey of the same padded sizes."""
        system = self.system
        if not (fit_mapping and fit_stars):
            system = system._replace(tiles=())
        if not fit_mapping:
            system = system._replace(block_members=jnp.zeros((0, 0), jnp.int64),
                                     block_groups=jnp.zeros((0, 0), jnp.int64))
        return system


@functools.partial(brief_jit, static_argnums=(0, 1))
def _moved(layout: ParameterLayout, move_mapping: bool, pm, ps, delta_mapping, delta_stars, alpha):
    """Parameters moved by alpha times a step (one program, not one per eager operation)."""
    new_ps = unflatten_stars(flatten_stars(ps) + alpha * delta_stars, ps)
    if not move_mapping:
        return pm, new_ps
    return layout.unflatten(layout.flatten(pm) + alpha * delta_mapping, pm), new_ps


_take = brief_jit(lambda arrays, rows: tuple(a[rows] for a in arrays))


def _host_rows(arrays: tuple[jax.Array, ...], rows: np.ndarray) -> list[np.ndarray]:
    """a[rows] for each of `arrays`, gathered on the device in one program and fetched (rows
    padded to a bucketed count, so that few programs compile; eager indexing would compile one
    per array and count)."""
    padded = np.zeros(bucket(len(rows), minimum=1), np.int64)
    padded[: len(rows)] = rows
    return [np.asarray(a)[: len(rows)] for a in _take(tuple(arrays), jnp.asarray(padded))]


def _pad_rows(a: np.ndarray, size: int, fill=None) -> np.ndarray:
    """`a` grown to `size` rows: with `fill`, or repeating row 0 (valid data) when fill is None."""
    extra = size - a.shape[0]
    if extra <= 0:
        return a
    pad = np.repeat(a[:1], extra, axis=0) if fill is None else np.full((extra,) + a.shape[1:], fill, a.dtype)
    return np.concatenate([a, pad], axis=0)


def _pad_tree(tree, size: int):
    return jax.tree.map(lambda a: jnp.asarray(_pad_rows(np.asarray(a), size)), tree)


def _padded(problem: StructuredProblem, n: int, s: int) -> StructuredProblem:
    """Padding measurements repeat row 0 (finite data; they get weight 0); padding stars
    repeat star 0 and are held fixed (no measurement, no prior)."""
    pad_m = lambda tree: jax.tree.map(lambda a: _pad_rows(np.asarray(a), n), tree)  # noqa: E731
    pad_s = lambda tree: jax.tree.map(lambda a: _pad_rows(np.asarray(a), s), tree)  # noqa: E731
    return dataclasses.replace(
        problem, stars=_pad_tree(problem.stars, s), data=pad_m(problem.data), index=pad_m(problem.index),
        star_data=None if problem.star_data is None else pad_s(problem.star_data), star_xyz=pad_s(problem.star_xyz),
        prior_dof=None if problem.prior_dof is None else _pad_rows(np.asarray(problem.prior_dof), s, 0.0),
        prior_rejectable=None if problem.prior_rejectable is None
        else _pad_rows(np.asarray(problem.prior_rejectable, bool), s, False))


def implicit_function(solver: Solver, state: FitState, mapping_mask, star_mask):
    """The converged solution as a differentiable JAX function of the fit's inputs.

    Returns `solution(measurements, references) -> (mapping (N,), stars (S, q))`, where
    `measurements` maps names of per-measurement data arrays (e.g. "x", "y") to (n,) arrays and
    `references` names of per-star prior data (e.g. "ra", "dec") to (S, ...) arrays. Its value
    is the converged fit (evaluate it at the fitted inputs); its derivative is the implicit
    function theorem's, computed in the backward pass by one Schur solve and one
    vector-Jacobian product of the residuals (`implicit_cotangents`), never by unrolling
    iterations. So `jax.grad`/`jax.jacobian` of any scalar of the solution (a star's fitted
    position, the model at a pixel, ...) flow back to centroids and reference positions.
    """
    (pm, sm), (ps, ss) = solver.split(state.mapping, state.stars)
    theta_m = solver.layout.flatten(pm) if solver.layout.size else jnp.zeros(0)
    theta_s = flatten_stars(ps)[: solver.stars_real]
    smask = solver._effective_star_mask(state, star_mask)
    n, s = solver.n_real, solver.stars_real

    @jax.custom_vjp
    def solution(measurements: dict, references: dict):
        return theta_m, theta_s

    def forward(measurements, references):
        return (theta_m, theta_s), (measurements, references)  # kept only for their keys

    def backward(inputs, bars):
        bar_m, bar_s = bars
        bar_s = jnp.concatenate([bar_s, jnp.zeros((solver.n_stars - s, bar_s.shape[1]))])
        data_bar, star_bar = _implicit(solver.problem.residual_fn, solver.problem.prior_fn, solver.layout,
                                       (pm, sm), (ps, ss), solver.data, solver.star_data, solver.system,
                                       jnp.asarray(state.weights), jnp.asarray(state.star_weights),
                                       mapping_mask, smask, bar_m, bar_s)
        return ({k: data_bar[k][:n] for k in inputs[0]}, {k: star_bar[k][:s] for k in inputs[1]})

    solution.defvjp(forward, backward)
    return solution
