"""What the solver is given and what it works on: the problem, its prepared (padded) form, the state.

`StructuredProblem` is what a calibration hands the solver: a residual function per measurement,
an optional prior per star (the reference catalog), the mapping model and the stars as equinox
modules, per-measurement data and group indices. `prepare` turns it, once and on the host, into a
`PreparedProblem`: sizes padded to buckets (so that a survey of similar size reuses the compiled
programs), the parameter layout and the device structure of the normal equations. `FitState` is
the immutable point a fit has reached: every step returns a new one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from jcal_models import parameter_filter

from .layout import BlockGroups, ParameterLayout, Tiles, bucket, choose_tile_classes, fill_flops
from .normal_equations import System, TileSet

CG_ABOVE_FLOPS = 50e9  # fill work per step above which joint steps reuse an earlier factor
# Fill work per step below which the linearisation and the joint step, too, compile for compile
# speed (`compile.brief_jit`): their runs are then short next to their compilation.
BRIEF_BELOW_FLOPS = 5e9


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
    stars_per_tile: int = 64  # measured in benchmarks/RESULTS.md (solver tiles)
    # Tiles are padded per class of similar width (`Tiles.split`); each class compiles its own
    # fill. None: as few classes as pad the fill little (`layout.choose_tile_classes`).
    tile_classes: int | None = None
    # Joint steps after the first solve the reduced system by conjugate gradients preconditioned
    # by the last assembled one (`normal_equations.Preconditioner`). None: when the fill costs
    # more than `CG_ABOVE_FLOPS` per step.
    reuse_factor: bool | None = None


@dataclass(frozen=True)
class FitState:
    """Where a fit is: parameters, which terms are in use, and what happened so far.

    Arrays have the padded sizes of the `PreparedProblem`; steps return new states
    (`dataclasses.replace`), never change one."""

    mapping: Any
    stars: Any
    weights: np.ndarray  # (n,) 1 = used, 0 = rejected outlier
    star_weights: np.ndarray  # (S,) prior (reference) used
    history: tuple[dict, ...] = ()  # one entry per step
    converged: bool = True
    n_outliers: int = 0
    n_reference_outliers: int = 0
    unusable: np.ndarray | None = None  # (n,) weight 0 from the start (e.g. no flux): never re-admitted
    held_out_chi2: np.ndarray | None = None  # (n,) chi2 of held-out measurements (`recipe.FitHeldOut`)

    def replace(self, **changes) -> "FitState":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class PreparedProblem:
    """A problem padded and laid out for the solver's programs (host arrays and device structure).

    `data` is the per-measurement data as the programs see them; a calibration that refreshes its
    error model between stages replaces it (`with_data`)."""

    problem: StructuredProblem  # padded
    layout: ParameterLayout
    system: System
    mapping_filter: Any
    star_filter: Any
    data: dict[str, jax.Array]
    star_data: dict[str, jax.Array] | None
    n_real: int
    stars_real: int
    n_measurements: int  # padded sizes, as the device arrays have them
    n_stars: int
    reuse_factor: bool
    brief: bool
    sizes: dict[str, Any]

    def with_data(self, name: str, values) -> "PreparedProblem":
        """This problem with one per-measurement data array (real size) replaced."""
        padded = jnp.asarray(pad_rows(np.asarray(values), self.n_measurements))
        return dataclasses.replace(self, data=dict(self.data, **{name: padded}))

    def split(self, mapping, stars):
        """((fitted, fixed) mapping leaves, (fitted, fixed) star leaves)."""
        return eqx.partition(mapping, self.mapping_filter), eqx.partition(stars, self.star_filter)

    def mapping_mask(self, mask_tree=None) -> np.ndarray:
        """(N,) 1 for free mapping parameters; `mask_tree` like the fitted leaves, 0/1 arrays.
        Host arrays, as the other masks: eager device operations would each compile."""
        if mask_tree is None:
            return np.ones(self.layout.size)
        leaves = jax.tree.leaves(mask_tree)
        return np.concatenate([np.ravel(np.asarray(a, np.float64)) for a in leaves]) if leaves else np.zeros(0)

    def effective_star_mask(self, state: FitState, star_mask) -> np.ndarray:
        """Stars with no unrejected measurement and no prior have nothing to fit: fix them."""
        star_mask = pad_rows(np.asarray(star_mask, np.float64), self.n_stars, 0.0)
        active = np.bincount(np.asarray(self.problem.index["star"]), weights=state.weights, minlength=self.n_stars)
        if self.problem.prior_dof is not None:
            active = active + state.star_weights * (self.problem.prior_dof > 0)
        return star_mask * (active > 0)[:, None]

    def system_for(self, fit_mapping: bool, fit_stars: bool) -> System:
        """The structure a program needs: the fill's tiles only with both mapping and stars fitted,
        the block groups only with the mapping. Their shapes come from the data, and a program
        that does not take them is reused by any survey of the same padded sizes."""
        system = self.system
        if not (fit_mapping and fit_stars):
            system = system._replace(tiles=())
        if not fit_mapping:
            system = system._replace(block_members=jnp.zeros((0, 0), jnp.int64),
                                     block_groups=jnp.zeros((0, 0), jnp.int64))
        return system


def prepare(problem: StructuredProblem) -> PreparedProblem:
    """Pad `problem` to bucketed sizes and lay out its parameters and normal equations (host, once)."""
    n_real, stars_real = len(problem.index["star"]), int(problem.star_xyz.shape[0])
    n, s = bucket(n_real), bucket(stars_real)
    problem = _padded(problem, n, s)
    filt = problem.mapping_filter if problem.mapping_filter is not None else parameter_filter(problem.mapping)
    pm, _ = eqx.partition(problem.mapping, filt)
    layout = ParameterLayout.of(pm, problem.mapping)
    star_filter = parameter_filter(problem.stars)
    groups = layout.group_index(problem.index, n)
    # padding measurements (weight 0, zero Jacobian rows) belong to no block and no tile
    real = slice(0, n_real)
    blocks = BlockGroups.of(groups[real])
    tiles = Tiles.of(np.asarray(problem.index["star"])[real], problem.star_xyz, groups[real],
                     problem.stars_per_tile)
    star_params = int(flatten_stars(eqx.filter(problem.stars, star_filter)).shape[1])
    tile_classes = (tiles.split(layout.row_sizes, problem.tile_classes) if problem.tile_classes
                    else choose_tile_classes(tiles, layout.row_sizes, star_params))
    system = System(
        index={k: jnp.asarray(v) for k, v in problem.index.items()},
        columns=jnp.asarray(layout.columns(groups)),
        block_members=jnp.asarray(blocks.members),
        block_groups=jnp.asarray(blocks.groups),
        tiles=tuple(TileSet(jnp.asarray(t.stars), jnp.asarray(t.measurements), jnp.asarray(t.star_local),
                            tuple(jnp.asarray(s) for s in t.slots), tuple(jnp.asarray(g) for g in t.groups))
                    for t in tile_classes),
    )
    fill = fill_flops(tile_classes, layout.row_sizes, star_params)
    sizes = {
        "measurements": n_real, "stars": stars_real, "mapping_parameters": layout.size,
        "star_parameters": star_params * stars_real, "padded_measurements": n, "padded_stars": s,
        "block_groups": int(blocks.members.shape[0]), "tiles": int(tiles.measurements.shape[0]),
        "tile_width": int(tiles.measurements.shape[1]),
        "tile_columns": [t.columns(layout.row_sizes) for t in tile_classes],
        "fill_gflop": round(fill / 1e9, 1),
    }
    return PreparedProblem(
        problem, layout, system, filt, star_filter, jax.tree.map(jnp.asarray, problem.data),
        None if problem.star_data is None else jax.tree.map(jnp.asarray, problem.star_data),
        n_real, stars_real, n, s,
        problem.reuse_factor if problem.reuse_factor is not None else fill > CG_ABOVE_FLOPS,
        fill < BRIEF_BELOW_FLOPS, sizes)


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


def pad_rows(a: np.ndarray, size: int, fill=None) -> np.ndarray:
    """`a` grown to `size` rows: with `fill`, or repeating row 0 (valid data) when fill is None."""
    extra = size - a.shape[0]
    if extra <= 0:
        return a
    pad = np.repeat(a[:1], extra, axis=0) if fill is None else np.full((extra,) + a.shape[1:], fill, a.dtype)
    return np.concatenate([a, pad], axis=0)


def pad_tree(tree, size: int):
    return jax.tree.map(lambda a: jnp.asarray(pad_rows(np.asarray(a), size)), tree)


def _padded(problem: StructuredProblem, n: int, s: int) -> StructuredProblem:
    """Padding measurements repeat row 0 (finite data; they get weight 0); padding stars
    repeat star 0 and are held fixed (no measurement, no prior)."""
    pad_m = lambda tree: jax.tree.map(lambda a: pad_rows(np.asarray(a), n), tree)  # noqa: E731
    pad_s = lambda tree: jax.tree.map(lambda a: pad_rows(np.asarray(a), s), tree)  # noqa: E731
    return dataclasses.replace(
        problem, stars=pad_tree(problem.stars, s), data=pad_m(problem.data), index=pad_m(problem.index),
        star_data=None if problem.star_data is None else pad_s(problem.star_data), star_xyz=pad_s(problem.star_xyz),
        prior_dof=None if problem.prior_dof is None else pad_rows(np.asarray(problem.prior_dof), s, 0.0),
        prior_rejectable=None if problem.prior_rejectable is None
        else pad_rows(np.asarray(problem.prior_rejectable, bool), s, False))
