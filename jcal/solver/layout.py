"""Host-side (numpy) layout of a structured least-squares problem, computed once per fit.

A measurement touches one star and, for each fitted leaf of the mapping model, one group
(row) of that leaf (its detector, its visit, ...). This module works out, once:

- `ParameterLayout`: where every fitted leaf lives in the flat mapping vector;
- the global columns each measurement's local Jacobian row scatters to;
- `BlockGroups`: measurements sharing the same groups (a detector-visit), padded so that
  their J^T J is one batched matmul;
- `Tiles`: stars cut into spatially compact tiles, for the Schur-complement fill; each tile
  touches few groups, so its fill is a small dense matmul in tile-local coordinates.

Shapes are rounded up to a few sizes (`bucket`) so that a second fit of similar size
reuses the compiled step.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from jcal_models import GLOBAL, group_keys

from ..arrays import unique_rows


_NO_GROUP = np.iinfo(np.int32).max  # padding group index: out of range, its updates are dropped


def bucket(n: int, minimum: int = 8) -> int:
    """Round up to 1, 1.25, 1.5 or 1.75 times a power of two: few distinct compiled shapes."""
    n = max(int(n), minimum)
    if n <= 4:
        return n
    p = 1 << ((n - 1).bit_length() - 1)
    for f in (1.0, 1.25, 1.5, 1.75, 2.0):
        if n <= f * p:
            return int(f * p)
    return 2 * p


@dataclass(frozen=True)
class ParameterLayout:
    """The flat mapping-parameter vector: leaf k occupies offsets[k] : offsets[k] + G_k p_k."""

    keys: tuple[str, ...]  # group key of each fitted leaf
    n_groups: tuple[int, ...]  # G_k
    row_sizes: tuple[int, ...]  # p_k: parameters per group
    offsets: tuple[int, ...]
    local_offsets: tuple[int, ...]  # where leaf k starts in one measurement's local row

    @classmethod
    def of(cls, params, full_model) -> "ParameterLayout":
        """Layout of the fitted leaves `params` (a partition of `full_model`)."""
        keys_tree = group_keys(full_model)
        is_param = jax.tree.map(lambda p: p is not None, params, is_leaf=lambda x: x is None)
        keys = [k for k, keep in zip(jax.tree.leaves(keys_tree), jax.tree.leaves(is_param)) if keep]
        leaves = jax.tree.leaves(params)
        n_groups = tuple(1 if k == GLOBAL else int(a.shape[0]) for k, a in zip(keys, leaves))
        row_sizes = tuple(int(a.size) // g for a, g in zip(leaves, n_groups))
        sizes = [g * p for g, p in zip(n_groups, row_sizes)]
        return cls(tuple(keys), n_groups, row_sizes, tuple(np.cumsum([0] + sizes[:-1]).tolist()),
                   tuple(np.cumsum([0] + list(row_sizes[:-1])).tolist()))

    @property
    def size(self) -> int:
        return int(sum(g * p for g, p in zip(self.n_groups, self.row_sizes)))

    @property
    def local_size(self) -> int:
        return int(sum(self.row_sizes))

    def flatten(self, params) -> jax.Array:
        return jnp.concatenate([jnp.ravel(a) for a in jax.tree.leaves(params)]) if self.keys else jnp.zeros(0)

    def unflatten(self, vector: jax.Array, params):
        leaves, treedef = jax.tree.flatten(params)
        new = [vector[o:o + a.size].reshape(a.shape) for o, a in zip(self.offsets, leaves)]
        return jax.tree.unflatten(treedef, new)

    def group_index(self, index: dict[str, np.ndarray], n: int) -> np.ndarray:
        """(n, n_leaves) group of each leaf touched by each measurement."""
        return np.stack([np.zeros(n, np.int64) if k == GLOBAL else np.asarray(index[k], np.int64)
                         for k in self.keys], axis=1) if self.keys else np.zeros((n, 0), np.int64)

    def columns(self, groups: np.ndarray) -> np.ndarray:
        """(n, local_size) global column of each local Jacobian column, from `group_index`."""
        parts = [o + groups[:, k:k + 1] * p + np.arange(p)[None, :]
                 for k, (o, p) in enumerate(zip(self.offsets, self.row_sizes))]
        return np.concatenate(parts, axis=1) if parts else np.zeros((groups.shape[0], 0), np.int64)


@dataclass(frozen=True)
class BlockGroups:
    """Measurements with identical group tuples (e.g. one detector-visit), padded."""

    members: np.ndarray  # (B, M) measurement index; padding = n (gathers as zero)
    groups: np.ndarray  # (B, n_leaves) the shared group of each leaf; padding rows = G_k (dropped)

    @classmethod
    def of(cls, group_index: np.ndarray) -> "BlockGroups":
        n = group_index.shape[0]
        first, block = unique_rows(group_index)
        unique = group_index[first]
        order = np.argsort(block, kind="stable")
        counts = np.bincount(block, minlength=len(unique))
        n_blocks, width = bucket(len(unique)), bucket(counts.max())
        members = np.full((n_blocks, width), n, np.int64)
        rank = rank_in_groups(counts)
        members[block[order], rank] = order
        groups = np.full((n_blocks, group_index.shape[1]), np.iinfo(np.int32).max, np.int64)
        groups[: len(unique)] = unique
        return cls(members, groups)


@dataclass(frozen=True)
class Tiles:
    """Stars cut into spatially compact tiles of `stars_per_tile`, padded to common shapes."""

    stars: np.ndarray  # (T, S_t) star in each slot, padding n_stars
    measurements: np.ndarray  # (T, M) measurement index, padding n
    star_local: np.ndarray  # (T, M) star slot within the tile
    slots: tuple[np.ndarray, ...]  # per leaf: (T, M) local group slot of each measurement
    groups: tuple[np.ndarray, ...]  # per leaf: (T, K_k) global group in each slot, padding out of range
    stars_per_tile: int
    padding: int  # the measurement index that pads a tile (gathers as zero)

    @classmethod
    def of(cls, star: np.ndarray, star_xyz: np.ndarray, group_index: np.ndarray,
           stars_per_tile: int) -> "Tiles":
        """`star` (n,) star of each measurement; `star_xyz` (S, 3) unit vectors for ordering."""
        n, n_stars = star.shape[0], star_xyz.shape[0]
        tile_of_star = np.empty(n_stars, np.int64)
        n_tiles = -(-n_stars // stars_per_tile)
        order_stars = _spatial_order(star_xyz)
        star_rank = np.empty(n_stars, np.int64)
        star_rank[order_stars] = np.arange(n_stars) % stars_per_tile
        tile_of_star[order_stars] = np.arange(n_stars) // stars_per_tile

        tile = tile_of_star[star]
        order = np.lexsort((star, tile))
        counts = np.bincount(tile, minlength=n_tiles)
        width = bucket(counts.max())
        n_tiles_padded = bucket(n_tiles, minimum=1)
        stars = np.full((n_tiles_padded, stars_per_tile), n_stars, np.int64)
        stars[tile_of_star, star_rank] = np.arange(n_stars)
        rank = rank_in_groups(counts)
        measurements = np.full((n_tiles_padded, width), n, np.int64)
        measurements[tile[order], rank] = order
        star_local = np.zeros_like(measurements)
        star_local[tile[order], rank] = star_rank[star[order]]

        slots, groups = [], []
        for k in range(group_index.shape[1]):
            # distinct groups of leaf k per tile -> local slots
            pair_rows = np.stack([tile, group_index[:, k]], 1)
            first_of, inverse = unique_rows(pair_rows)
            pairs = pair_rows[first_of]
            per_tile = np.bincount(pairs[:, 0], minlength=n_tiles)
            first = np.cumsum(per_tile) - per_tile
            slot_of_pair = np.arange(len(pairs)) - first[pairs[:, 0]]
            k_width = bucket(per_tile.max(), minimum=1)
            g = np.full((n_tiles_padded, k_width), _NO_GROUP, np.int64)
            g[pairs[:, 0], slot_of_pair] = pairs[:, 1]
            s = np.zeros_like(measurements)
            s[tile[order], rank] = slot_of_pair[inverse[order]]
            slots.append(s)
            groups.append(g)
        return cls(stars, measurements, star_local, tuple(slots), tuple(groups), stars_per_tile, n)

    def columns(self, row_sizes: tuple[int, ...]) -> int:
        """Mapping columns of a (padded) tile: the width of its fill."""
        return int(sum(g.shape[1] * p for g, p in zip(self.groups, row_sizes)))

    def split(self, row_sizes: tuple[int, ...], n_classes: int = 8) -> tuple["Tiles", ...]:
        """Tiles in `n_classes` classes of similar width, each padded to its own widest tile.

        A tile's fill costs (its columns)^2, and tiles differ (a field's edge is seen by fewer
        visits than its centre): padding every tile to the widest overall wasted ~2x here.
        Each class is compiled on its own: `choose_tile_classes` weighs the two. (On medium, 4
        classes compile the joint step 0.7 s faster than 8 and run it 3 % slower.)
        """
        used = [(g < _NO_GROUP).sum(axis=1) for g in self.groups]  # (T,) groups per leaf
        columns = sum(u * p for u, p in zip(used, row_sizes))
        classes = []
        for idx in np.array_split(np.argsort(columns, kind="stable"), n_classes):
            if len(idx) == 0:
                continue
            width = bucket(int((self.measurements[idx] != self.padding).sum(axis=1).max()), minimum=1)
            widths = [bucket(int(u[idx].max()), minimum=1) for u in used]
            classes.append(Tiles(self.stars[idx], self.measurements[idx, :width], self.star_local[idx, :width],
                                 tuple(sl[idx, :width] for sl in self.slots),
                                 tuple(g[idx, :w] for g, w in zip(self.groups, widths)), self.stars_per_tile,
                                 self.padding))
        return tuple(classes)


def fill_flops(classes: tuple[Tiles, ...], row_sizes: tuple[int, ...], star_params: int) -> float:
    """Flops of one step's fill over padded tile classes: per tile a (W x S q) (S q x W) product."""
    return float(sum(2.0 * t.stars.shape[0] * t.stars_per_tile * star_params * t.columns(row_sizes) ** 2
                     for t in classes))


def choose_tile_classes(tiles: Tiles, row_sizes: tuple[int, ...], star_params: int,
                 extra_flops: float = 5e9) -> tuple[Tiles, ...]:
    """`tiles.split` into the fewest of 2, 4 or 8 classes whose padding adds less than
    `extra_flops` per step to the fill of 8 classes. Each class compiles its own fill (~0.2 s);
    5 GFlop is ~0.07 s of a step here. Measured fill work for 2/4/8 classes (GFlop per step):
    medium astrometry 39.5/35.0/30.9 (-> 4), large 228/177/158 and huge 3 453/2 873/2 462 (-> 8);
    photometry (one flux per star) medium 1.6/1.4/1.2 and large 9.1/7.3/6.5 (-> 2), huge
    180/132/117 (-> 8: 2 classes made its photometry ~6 s slower)."""
    finest = tiles.split(row_sizes, 8)
    limit = fill_flops(finest, row_sizes, star_params) + extra_flops
    for n in (2, 4):
        classes = tiles.split(row_sizes, n)
        if fill_flops(classes, row_sizes, star_params) < limit:
            return classes
    return finest


def rank_in_groups(counts: np.ndarray) -> np.ndarray:
    """For items sorted by group, with `counts` items per group: each item's rank in its group."""
    return np.arange(int(np.sum(counts))) - np.repeat(np.cumsum(counts) - counts, counts)


def _spatial_order(xyz: np.ndarray) -> np.ndarray:
    """Stars ordered along a Morton (Z-order) curve of their sky position: nearby -> close."""
    if len(xyz) == 0:
        return np.zeros(0, np.int64)
    # project to the mean tangent plane, quantise to 2^16 cells per axis, interleave bits
    centre = xyz.mean(axis=0)
    centre /= np.linalg.norm(centre)
    east = np.cross([0.0, 0.0, 1.0], centre)
    east = east / np.linalg.norm(east) if np.linalg.norm(east) > 1e-12 else np.array([1.0, 0.0, 0.0])
    north = np.cross(centre, east)
    u, v = xyz @ east, xyz @ north
    q = [(np.clip((a - a.min()) / max(np.ptp(a), 1e-300), 0, 1) * 65535).astype(np.uint64) for a in (u, v)]
    code = np.zeros(len(xyz), np.uint64)
    for bit in range(16):
        code |= ((q[0] >> np.uint64(bit)) & np.uint64(1)) << np.uint64(2 * bit)
        code |= ((q[1] >> np.uint64(bit)) & np.uint64(1)) << np.uint64(2 * bit + 1)
    return np.argsort(code, kind="stable")
