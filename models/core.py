"""The contract every model form meets, and the three helpers the solver builds on.

A *model form* is an `equinox.Module` whose `__call__` maps ONE point (scalars in, scalars
out). Parameters that differ between detectors, visits or detector-visits live inside a
`Grouped(inner, by="detector")` wrapper: every array leaf of `inner` then carries a leading
group axis, and the solver hands the form, per measurement, a view in which that axis has
been indexed away (`gather`). So a researcher writes the single-point formula,

    class MyTerm(eqx.Module):
        coeffs: Float[Array, "2 3"]
        def __call__(self, x, y):
            return x + self.coeffs[0] @ (1, x, y), y + self.coeffs[1] @ (1, x, y)

wraps it in `Grouped(MyTerm(coeffs=jnp.zeros((n_visits, 2, 3))), by="visit")`, and the
solver derives every per-measurement Jacobian block with `jax.jacrev` - no hand-written
derivatives, and never a dense Jacobian over all parameters.

Which leaves are fitted: all inexact arrays except fields declared with `fixed_field()`
(normalisation constants, tangent points) - see `parameter_filter`; `freeze` fixes more.

An astrometric form that ends in each visit's tangent plane subclasses
`astrometry.TangentPlaneAstrometry` and writes `tangent(x, y)` (pixels -> that plane) instead
of `__call__`: the fit then compares measurements and stars in that plane, where nothing
trigonometric is differentiated.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

GLOBAL = "global"  # group key of parameters shared by every measurement


def fixed_field(**kwargs: Any) -> Any:
    """A module field holding arrays that are data, not parameters (never fitted)."""
    return eqx.field(metadata={"fixed": True}, **kwargs)


class Transform(eqx.Module):
    """A map of one 2-d point to another; `a | b` chains them (apply `a`, then `b`)."""

    def __call__(self, x, y):  # pragma: no cover - abstract
        raise NotImplementedError

    def __or__(self, other: "Transform") -> "Chain":
        return Chain(self, other)


class Chain(Transform):
    """`first` then `second` (astropy.modeling's `|`)."""

    first: Transform
    second: Transform

    def __call__(self, x, y):
        return self.second(*self.first(x, y))


class Grouped(Transform):
    """`inner` with one set of parameters per group (detector, visit, detector-visit, ...).

    Stored form: every array leaf of `inner` has a leading axis of length `n_groups`.
    Inside the solver each measurement sees a gathered view (leading axis removed).
    """

    inner: Transform
    by: str = eqx.field(static=True)

    def __call__(self, x, y):
        return self.inner(x, y)

    @property
    def n_groups(self) -> int:
        return jax.tree.leaves(self.inner)[0].shape[0]


def _is_grouped(node: Any) -> bool:
    return isinstance(node, Grouped)


def gather(tree: Any, index: dict[str, jax.Array]) -> Any:
    """The view of `tree` that one measurement sees: each `Grouped` indexed at `index[by]`.

    `index` maps group keys to integer scalars (or to (n,) arrays, giving a batch view with a
    leading measurement axis). Leaves that are `None` (partitioned away) stay `None`.
    """

    def select(node):
        if _is_grouped(node):
            return Grouped(jax.tree.map(lambda a: a[index[node.by]], node.inner), node.by)
        return node

    return jax.tree.map(select, tree, is_leaf=_is_grouped)


def group_keys(tree: Any) -> Any:
    """A pytree like `tree` whose array leaves are replaced by their group key (`GLOBAL` if none)."""

    def keys(node):
        if _is_grouped(node):
            return Grouped(jax.tree.map(lambda _: node.by, node.inner), node.by)
        return jax.tree.map(lambda _: GLOBAL, node)

    return jax.tree.map(keys, tree, is_leaf=_is_grouped)


def parameter_filter(tree: Any) -> Any:
    """Bool pytree: True for fitted leaves (inexact arrays outside `fixed_field`s)."""

    def fitted(path, leaf) -> bool:
        node = tree
        for key in path:  # walk down, looking for a `fixed_field` on the way
            if isinstance(key, jax.tree_util.GetAttrKey):
                spec = getattr(node, "__dataclass_fields__", {}).get(key.name)
                if spec is not None and spec.metadata.get("fixed", False):
                    return False
                node = getattr(node, key.name)
            elif isinstance(key, jax.tree_util.SequenceKey):
                node = node[key.idx]
            elif isinstance(key, jax.tree_util.DictKey):
                node = node[key.key]
        return eqx.is_inexact_array(leaf)

    return jax.tree_util.tree_map_with_path(fitted, tree)


def freeze(filter_tree: Any, where: Callable[[Any], Any]) -> Any:
    """Mark the sub-tree selected by `where` as not fitted, e.g. `freeze(f, lambda m: m.chip)`."""
    node = where(filter_tree)
    return eqx.tree_at(where, filter_tree, jax.tree.map(lambda _: False, node))


def n_parameters(params: Any) -> int:
    """Number of scalar parameters in a (partitioned) parameter pytree."""
    return sum(int(jnp.size(leaf)) for leaf in jax.tree.leaves(params))


def evaluate(model: Transform, index: dict[str, jax.Array], x: jax.Array, y: jax.Array):
    """Evaluate a model form on arrays: measurement i uses groups `index[key][i]`."""
    return jax.vmap(lambda idx, xi, yi: gather(model, idx)(xi, yi))(index, x, y)
