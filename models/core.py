"""The contract every model form meets, and the three helpers the solver builds on.

A *model form* is an `equinox.Module` whose `__call__` maps ONE point (scalars in, scalars
out). Parameters that differ between detectors, visits or detector-visits live inside a
`Grouped(inner, by="detector")` wrapper: every array leaf of `inner` then carries a leading
group axis, and the solver hands the form, per measurement, a view in which that axis has
been indexed away (`gather`). So a researcher writes the single-point formula,

    class MyTerm(jm.Transform):
        coeffs: Float[Array, "2 3"]
        def __call__(self, x, y):
            return x + self.coeffs[0] @ (1, x, y), y + self.coeffs[1] @ (1, x, y)

wraps it in `Grouped(MyTerm(coeffs=jnp.zeros((n_visits, 2, 3))), by="visit")`, and the
solver derives every per-measurement Jacobian block with `jax.jacrev` - no hand-written
derivatives, and never a dense Jacobian over all parameters.

Types: `Transform` (abstract `__call__`, `a | b` chains) is the base of every 2-d map; it is an
`AbstractForm`, whose default hooks the fit calls on the form it is given (`fix_gauge`: nothing
held; `first_stage`: none). Every subclass of `AbstractForm` is registered for saving by its
module and name (`registry`); other modules inside a form register with `@register`.

Which leaves are fitted: all inexact arrays except fields declared with `fixed_field()`
(normalisation constants, tangent points) - see `parameter_filter`; `freeze` fixes more.

An astrometric form that ends in each visit's tangent plane subclasses
`astrometry.TangentPlaneAstrometry` and writes `tangent(x, y)` (pixels -> that plane) instead
of `__call__`: the fit then compares measurements and stars in that plane, where nothing
trigonometric is differentiated. See docs/model_forms.md.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .registry import register

GLOBAL = "global"  # group key of parameters shared by every measurement


def namespace(*arrays: Any):
    """The array namespace to evaluate with: jax.numpy if any argument is a JAX array (or a
    tracer, as inside the fit), else the array-API namespace `array_api_compat` finds when it is
    installed, else numpy. Forms call it on their inputs so that a fitted model evaluates on
    numpy arrays without JAX tracing (`evaluate(..., xp=numpy)`)."""
    if any(isinstance(a, jax.Array) for a in arrays):
        return jnp
    try:
        from array_api_compat import array_namespace
    except ImportError:
        return np
    arrays = [a for a in arrays if not isinstance(a, (int, float, complex, np.generic))]  # scalars: any namespace
    return array_namespace(*arrays) if arrays else np


def fixed_field(**kwargs: Any) -> Any:
    """A module field holding arrays that are data, not parameters (never fitted)."""
    return eqx.field(metadata={"fixed": True}, **kwargs)


class AbstractForm(eqx.Module):
    """What the fit asks of the model form it is given, beyond evaluating it; subclasses are
    registered for saving (`registry.register`) when they are defined."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        register(cls)

    def fix_gauge(self, mask):
        """`mask` (a 0/1 pytree shaped like the fitted parameters) with the parameters that the
        form's degeneracies leave free set to 0. Default: nothing is degenerate."""
        return mask

    def first_stage(self, mask):
        """The mask of a first, mapping-only stage run before all others (e.g. the base map
        before added terms), or None for no such stage (the default)."""
        return None

    def stars_held(self, mask):
        """The mask of the mapping-only stage that follows `first_stage`, fitted while the stars are
        held (e.g. colour terms, which trade with the stars, held too). Default: `mask` itself."""
        return mask

    def sip_order(self) -> int | None:
        """SIP order that represents an astrometric form exactly; None: chosen per detector."""
        return None


class Transform(AbstractForm):
    """A map of one 2-d point to another; `a | b` chains them (apply `a`, then `b`)."""

    @abc.abstractmethod
    def __call__(self, x, y):
        """The image of ONE point (x, y) under a gathered view; with numpy (`evaluate(..., xp=numpy)`)
        the same formula is applied to arrays of points that share one group."""

    def __or__(self, other: "Transform") -> "Chain":
        return Chain(self, other)

    @property
    def compares_in_tangent_plane(self) -> bool:
        """True for a pixel -> sky form that goes through its visit's tangent plane (`tangent`,
        `project`): the astrometric residual is then taken there, without trigonometry."""
        return False


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

    def __check_init__(self):
        if not isinstance(self.by, str) or not self.by:
            raise ValueError(f"Grouped: `by` must name a group key (a non-empty string), not {self.by!r}")
        sizes = {jax.tree_util.keystr(path): leaf.shape[0] if leaf.ndim else None
                 for path, leaf in jax.tree_util.tree_leaves_with_path(self.inner) if hasattr(leaf, "ndim")}
        if not sizes:
            raise ValueError(f"Grouped(by={self.by!r}): `inner` holds no array, so there are no groups")
        if None in sizes.values() or len(set(sizes.values())) > 1:
            shown = ", ".join(f"{k}: {v if v is not None else 'scalar'}" for k, v in sizes.items())
            raise ValueError(f"Grouped(by={self.by!r}): every array of {type(self.inner).__name__} needs the same "
                             f"leading group axis; leading lengths are {shown}")

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
        if _is_grouped(node):  # tree.map rebuilds without __init__: a view has no group axis to check
            return jax.tree.map(lambda a: a[index[node.by]], node)
        return node

    return jax.tree.map(select, tree, is_leaf=_is_grouped)


def group_keys(tree: Any) -> Any:
    """A pytree like `tree` whose array leaves are replaced by their group key (`GLOBAL` if none)."""

    def keys(node):
        if _is_grouped(node):
            return jax.tree.map(lambda _: node.by, node)
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


def evaluate(model: Transform, index: dict[str, Any], x: Any, y: Any, xp: Any = None):
    """Evaluate a model form on arrays: measurement i uses groups `index[key][i]`.

    `xp=None` (or jax.numpy): one vmapped JAX evaluation, differentiable. Any other namespace
    (numpy): the model's arrays are taken to numpy and the form is called once per distinct
    group combination on all its points at once (the single-point formula broadcast over
    x, y), without JAX; results are returned as `xp` arrays."""
    if xp is None or xp is jnp:
        return jax.vmap(lambda idx, xi, yi: gather(model, idx)(xi, yi))(index, x, y)
    host = jax.tree.map(np.asarray, model)
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keys = sorted(index)
    combos = np.stack([np.asarray(index[k], dtype=np.int64).reshape(x.shape) for k in keys], axis=-1)
    unique, inverse = np.unique(combos.reshape(-1, len(keys)), axis=0, return_inverse=True)
    inverse = inverse.reshape(x.shape)
    out = None
    for g, combo in enumerate(unique):
        sel = inverse == g
        values = gather(host, dict(zip(keys, combo)))(x[sel], y[sel])
        parts = values if isinstance(values, tuple) else (values,)
        if out is None:
            out = [np.empty(x.shape, np.result_type(np.asarray(p).dtype, float)) for p in parts]
        for o, p in zip(out, parts):
            o[sel] = p
    out = [xp.asarray(o) for o in (out or [np.empty(x.shape)])]
    return tuple(out) if len(out) > 1 else out[0]
