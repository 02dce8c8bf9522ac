"""A fitted astrometric model with its visit/detector ids: evaluate, save and reload it.

Saved as two files, neither of which can execute code on load (`jcal_models.registry`):
`<name>.json` (the form's module tree by registered class names, and the ids) and `<name>.eqx`
(the array leaves, numpy's `.npy` format read without pickle). Any form saves this way - shipped,
`jcal_models.extra`, or a user's own class (docs/model_forms.md). Loading checks the whole file
first (ids sorted and unique, every group size matching its ids) and raises `InputError`
naming the file and the problem.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jcal_models as jm

from .data import InputError
from .jax_setup import ensure_configured
from .solver.compile import brief_jit
from .solver.layout import bucket

# id lists a saved astrometric solution holds, and the group key whose size each one gives
ASTROMETRY_IDS = {"visits": "visit", "detectors": "detector", "ccd_visits": "ccd_visit"}


def _id_array(document: dict, key: str, file: Path, pairs: bool) -> np.ndarray:
    """`document[key]` as sorted, unique int64 ids ((n, 2) rows when `pairs`), or InputError."""
    values = document.get(key)
    ok = isinstance(values, list) and all(
        (isinstance(v, list) and len(v) == 2 and all(type(w) is int for w in v)) if pairs else type(v) is int
        for v in values)
    if ok:
        try:
            ids = np.array(values, dtype=np.int64).reshape((-1, 2) if pairs else (-1,))
        except OverflowError:
            ok = False
    if not ok:
        raise InputError(f"{file}: {key!r} must be a list of {'[visit, detector] pairs' if pairs else 'integers'}")
    keys = ids[:, 0] * (1 << 32) + ids[:, 1] if pairs else ids
    if np.any(np.diff(keys) <= 0):
        at = int(np.flatnonzero(np.diff(keys) <= 0)[0])
        raise InputError(f"{file}: {key!r} must be sorted and unique; entry {at + 1} ({ids[at + 1].tolist()}) "
                         f"follows {ids[at].tolist()}")
    return ids


def read_solution(path: str | Path, like: Any, ids: dict[str, str], pairs: tuple[str, ...] = ("ccd_visits",),
                  extra_check=None) -> tuple[Any, dict, dict[str, np.ndarray]]:
    """(model, document, {id key: ids}) of a saved solution, every part checked before arrays are read.

    ids: maps each id list of the file to the group key whose size it gives.
    pairs: the id lists made of (visit, detector)-like pairs.
    extra_check: optional `f(document, ids, file)` checking more (photometry: bands)."""
    ensure_configured()  # the model's float64 arrays load as float64
    file = Path(path).with_suffix(".json")
    arrays: dict[str, np.ndarray] = {}

    def check(skeleton, document):
        for key in ids:
            arrays[key] = _id_array(document, key, file, key in pairs)
        if {"ccd_visits", "visits", "detectors"} <= set(arrays):
            for col, key in ((0, "visits"), (1, "detectors")):
                unknown = np.setdiff1d(arrays["ccd_visits"][:, col], arrays[key])
                if unknown.size:
                    raise InputError(f"{file}: 'ccd_visits' names {key[:-1]} {int(unknown[0])}, absent from {key!r}")
        if extra_check is not None:
            extra_check(document, arrays, file)
        sizes = {by: (key, len(arrays[key])) for key, by in ids.items()}
        for node in jax.tree.leaves(skeleton, is_leaf=lambda n: isinstance(n, jm.Grouped)):
            if isinstance(node, jm.Grouped) and node.by in sizes and node.n_groups != sizes[node.by][1]:
                key, n = sizes[node.by]
                raise InputError(f"{file}: the model has {node.n_groups} {node.by!r} groups but {key!r} lists {n}")

    try:
        model, document = jm.load_form(path, like=like, check=check)
    except jm.ModelFileError as exc:
        raise InputError(str(exc)) from exc
    return model, document, arrays


@dataclass(frozen=True)
class AstrometricSolution:
    """pixel -> sky for every fitted detector-visit, addressed by visit and detector id."""

    model: jm.Transform
    visits: np.ndarray  # (v,) visit ids, in model group order
    detectors: np.ndarray  # (d,)
    ccd_visits: np.ndarray  # (k, 2) (visit, detector)

    def index(self, visit, detector) -> dict[str, jax.Array]:
        visit, detector = np.broadcast_arrays(np.asarray(visit, np.int64), np.asarray(detector, np.int64))
        vi = np.searchsorted(self.visits, visit)
        di = np.searchsorted(self.detectors, detector)
        keys = self.ccd_visits[:, 0] * (1 << 32) + self.ccd_visits[:, 1]
        ki = np.searchsorted(keys, visit * (1 << 32) + detector)
        ok = ((vi < len(self.visits)) & (di < len(self.detectors)) & (ki < len(keys)))
        ok &= self.visits[np.minimum(vi, len(self.visits) - 1)] == visit
        ok &= keys[np.minimum(ki, len(keys) - 1)] == visit * (1 << 32) + detector
        if not np.all(ok):
            bad = np.flatnonzero(~ok.ravel())[0]
            raise KeyError(f"(visit, detector) = ({visit.ravel()[bad]}, {detector.ravel()[bad]}) was not fitted")
        return {"visit": jnp.asarray(vi.ravel()), "detector": jnp.asarray(di.ravel()),
                "ccd_visit": jnp.asarray(ki.ravel())}

    def pixel_to_sky(self, visit, detector, x, y, xp=None) -> tuple[Any, Any]:
        """(ra, dec) [deg] of 0-based pixel positions; arguments broadcast together.

        xp: None (default) evaluates with JAX, compiled; an array namespace such as `numpy`
        evaluates without JAX (`jcal_models.evaluate`) and returns arrays of that namespace."""
        visit, detector, x, y = np.broadcast_arrays(visit, detector, np.asarray(x, float), np.asarray(y, float))
        index = {k: np.asarray(v) for k, v in self.index(visit, detector).items()}
        x, y, shape = x.ravel(), y.ravel(), x.shape
        if xp is not None and xp is not jnp:
            ra, dec = jm.evaluate(self.model, index, x, y, xp=xp)
            return xp.reshape(ra, shape), xp.reshape(dec, shape)
        # fixed-size chunks (padded with the first point): one compiled program for any size
        chunk = _EVALUATE_CHUNK if x.size > _EVALUATE_CHUNK // 8 else bucket(x.size, minimum=1)
        ra, dec = np.empty(x.size), np.empty(x.size)
        for start in range(0, x.size, chunk):
            part = slice(start, min(start + chunk, x.size))
            pad = lambda a: np.concatenate([a[part], np.repeat(a[:1], chunk - (part.stop - start))])  # noqa: E731
            r, d = evaluate_model(self.model, {k: jnp.asarray(pad(v)) for k, v in index.items()}, jnp.asarray(pad(x)),
                                  jnp.asarray(pad(y)))
            ra[part], dec[part] = np.asarray(r)[: part.stop - start], np.asarray(d)[: part.stop - start]
        return ra.reshape(shape), dec.reshape(shape)

    def tangent_point(self, visit: int) -> tuple[float, float]:
        ra0, dec0 = self.tangent_points(np.array([visit]))[0]
        return float(ra0), float(dec0)

    def tangent_points(self, visits: np.ndarray) -> np.ndarray:
        """(n, 2) tangent point (ra, dec) [deg] of each visit's projection."""
        vi = np.searchsorted(self.visits, np.asarray(visits))
        sky = self.model.sky.inner
        return np.stack([np.asarray(sky.ra0)[vi], np.asarray(sky.dec0)[vi]], axis=1)

    def save(self, path: str | Path) -> None:
        """Write `<path>.json` and `<path>.eqx` (any registered form; TypeError naming what is not)."""
        jm.save_form(path, self.model, {"kind": "astrometry", "visits": self.visits.tolist(),
                                        "detectors": self.detectors.tolist(), "ccd_visits": self.ccd_visits.tolist()})

    @classmethod
    def load(cls, path: str | Path, like: jm.Transform | None = None) -> "AstrometricSolution":
        """Reload `save`'s files; `like`: a model of the same structure to read the arrays into
        (also reads files of jcal before the model format 2)."""
        model, _, ids = read_solution(path, like, ASTROMETRY_IDS)
        return cls(model, ids["visits"], ids["detectors"], ids["ccd_visits"])


evaluate_model = brief_jit(jm.evaluate)  # `jm.evaluate` as one program (eager: one per primitive)
_EVALUATE_CHUNK = 1 << 17  # points per evaluation call


def save_model(solution, path: str | Path) -> None:
    """Save a fitted astrometric model (an `AstrometricSolution`, or a `FitResult`'s) as
    `<path>.json` + `<path>.eqx`; `load_model(path)` reloads it exactly."""
    solution = getattr(solution, "solution", solution)
    if not isinstance(solution, AstrometricSolution):
        raise TypeError(f"save_model takes an AstrometricSolution or a FitResult, not {type(solution).__name__}")
    solution.save(path)


def load_model(path: str | Path, like: jm.Transform | None = None) -> AstrometricSolution:
    """Reload a model written by `FitResult.write` (`OUT/model`), `save_model` or `AstrometricSolution.save`."""
    return AstrometricSolution.load(path, like)
