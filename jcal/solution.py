"""A fitted astrometric model with its visit/detector ids: evaluate, save and reload it.

Saved as two files, neither of which can execute code on load: `<name>.json` (the form and
its static structure: orders, group sizes, ids) and `<name>.eqx` (the array leaves, written
by `equinox.tree_serialise_leaves`, i.e. numpy's `.npy` format without pickle).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import jcal_models as jm

from .solver.compile import brief_jit
from .solver.layout import bucket


def _structure(model: jm.Transform) -> dict:
    if isinstance(model, jm.extra.RadialAstrometry):
        return {**_structure(jm.ConstrainedAstrometry(chip=model.chip, visit=model.visit, sky=model.sky,
                                                      reference_detector=model.reference_detector)),
                "form": "radial"}
    if isinstance(model, jm.ConstrainedAstrometry):
        return {"form": "constrained", "chip_order": model.chip.inner.order, "visit_order": model.visit.inner.order,
                "n_detectors": model.chip.n_groups, "n_visits": model.visit.n_groups,
                "reference_detector": model.reference_detector}
    if isinstance(model, jm.SimpleAstrometry):
        return {"form": "simple", "order": model.ccd_visit.inner.order, "n_ccd_visits": model.ccd_visit.n_groups,
                "n_visits": model.sky.n_groups}
    raise TypeError(f"cannot describe a {type(model).__name__} for saving; pass `like=` a template to load_model "
                    "and save with save_model(..., structure={...})")


def _skeleton(s: dict) -> jm.Transform:
    """A model of the described structure with zero-filled arrays, to deserialise into."""
    z = np.zeros
    if s["form"] == "radial":
        return jm.extra.radial_astrometry(_skeleton({**s, "form": "constrained"}))
    if s["form"] == "constrained":
        nc, nv = jm.n_terms(s["chip_order"]), jm.n_terms(s["visit_order"])
        d, v = s["n_detectors"], s["n_visits"]
        return jm.constrained_astrometry(z((d, 2, nc)), z((d, 2)), z((d, 2)), s["chip_order"], z((v, 2, nv)),
                                         z((v, 2)), z((v, 2)), s["visit_order"], z(v), z(v), s["reference_detector"])
    if s["form"] == "simple":
        k, v = s["n_ccd_visits"], s["n_visits"]
        return jm.simple_astrometry(z((k, 2, jm.n_terms(s["order"]))), z((k, 2)), z((k, 2)), s["order"], z(v), z(v))
    raise ValueError(f"unknown model form {s['form']!r} in saved structure")


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

    def pixel_to_sky(self, visit, detector, x, y) -> tuple[np.ndarray, np.ndarray]:
        """(ra, dec) [deg] of 0-based pixel positions; arguments broadcast together."""
        visit, detector, x, y = np.broadcast_arrays(visit, detector, np.asarray(x, float), np.asarray(y, float))
        index = {k: np.asarray(v) for k, v in self.index(visit, detector).items()}
        x, y, shape = x.ravel(), y.ravel(), x.shape
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
        """Write `<path>.json` and `<path>.eqx`."""
        path = Path(path)
        meta = {"structure": _structure(self.model), "visits": self.visits.tolist(),
                "detectors": self.detectors.tolist(), "ccd_visits": self.ccd_visits.tolist()}
        path.with_suffix(".json").write_text(json.dumps(meta, indent=1))
        eqx.tree_serialise_leaves(path.with_suffix(".eqx"), self.model)

    @classmethod
    def load(cls, path: str | Path, like: jm.Transform | None = None) -> "AstrometricSolution":
        path = Path(path)
        meta = json.loads(path.with_suffix(".json").read_text())
        skeleton = like if like is not None else _skeleton(meta["structure"])
        model = eqx.tree_deserialise_leaves(path.with_suffix(".eqx"), skeleton)
        return cls(model, np.array(meta["visits"], np.int64), np.array(meta["detectors"], np.int64),
                   np.array(meta["ccd_visits"], np.int64).reshape(-1, 2))


evaluate_model = brief_jit(jm.evaluate)  # `jm.evaluate` as one program (eager: one per primitive)
_EVALUATE_CHUNK = 1 << 17  # points per evaluation call


def load_model(path: str | Path, like: jm.Transform | None = None) -> AstrometricSolution:
    """Reload a model written by `FitResult.write` (`OUT/model`) or `AstrometricSolution.save`."""
    return AstrometricSolution.load(path, like)
