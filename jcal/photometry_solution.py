"""A fitted photometric model with its ids: evaluate it anywhere, save it, reload it exactly.

The photometric counterpart of `jcal.solution`: `PhotometricSolution` (what `jcal.fit` returns in
`result.photometry.solution` and writes as `photometry_model.json/.eqx`), `save_photometric_model`,
`load_photometric_model`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import jcal_models as jm
from jcal_models.photometry import (AB_ZERO_POINT_NJY, PhotometricTransform, WithColourTerms)

from .solution import read_solution
from .data import InputError
from .solver.compile import brief_jit

# --------------------------------------------------------------------------------------------
# A fitted photometric model with its ids: evaluate, save, reload
# --------------------------------------------------------------------------------------------


def _group_keys_used(model) -> set[str]:
    return set(jax.tree.leaves(jm.group_keys(model)))


# id lists of a saved photometric solution and the group key whose size each one gives
PHOTOMETRY_IDS = {"visits": "visit", "detectors": "detector", "ccd_visits": "ccd_visit",
                  "band_detectors": "band_detector"}


def _check_bands(document: dict, ids: dict[str, np.ndarray], file: Path) -> None:
    """A saved photometric solution's bands: names, one band per visit, band-detector rows in range."""
    bands, visit_band = document.get("bands"), document.get("visit_band")
    if not isinstance(bands, list) or not all(isinstance(b, str) for b in bands):
        raise InputError(f"{file}: 'bands' must be a list of band names")
    if (not isinstance(visit_band, list) or len(visit_band) != len(ids["visits"])
            or not all(type(b) is int and 0 <= b < len(bands) for b in visit_band)):
        raise InputError(f"{file}: 'visit_band' must give, per visit ({len(ids['visits'])}), an index into 'bands'")
    bd = ids["band_detectors"]
    if bd.size and (bd[:, 0].max() >= len(bands) or bd[:, 1].max() >= len(ids["detectors"]) or bd.min() < 0):
        raise InputError(f"{file}: 'band_detectors' rows must be (band index, detector index) within range")
    errors = document.get("colour_slope_errors")
    if errors is not None and (not isinstance(errors, list) or len(errors) != len(bands)):
        raise InputError(f"{file}: 'colour_slope_errors' must list one value per band")


@brief_jit
def evaluate_calibration(model, index, x, y):
    """(calibration nJy/count, zero point AB mag) at arrays of pixels, measurement i in groups index[.][i]."""
    def one(idx, xi, yi):
        view = jm.gather(model, idx)
        value = view(xi, yi)
        if model.kind == "flux":
            return value, AB_ZERO_POINT_NJY - 2.5 * jnp.log10(value)
        return 10.0 ** (-0.4 * (value - AB_ZERO_POINT_NJY)), value

    return jax.vmap(one)(index, x, y)


@brief_jit
def local_means(pm, sm, index, gx, gy):
    """Per detector-visit k: mean calibration over its grid (gx[k], gy[k]) and its gradient with
    respect to the fitted parameters of the groups it sees, flattened in layout order."""

    def one(idx, x, y):
        def mean(pm_view):
            view = eqx.combine(pm_view, jm.gather(sm, idx))
            return jnp.mean(jax.vmap(view.calibration)(x, y))

        pm_view = jm.gather(pm, idx)
        grads = jax.tree.leaves(jax.grad(mean)(pm_view))
        flat = jnp.concatenate([g.ravel() for g in grads]) if grads else jnp.zeros(0)
        return mean(pm_view), flat

    return jax.vmap(one)(index, gx, gy)


@dataclass(frozen=True)
class PhotometricSolution:
    """pixel -> calibration for every fitted detector-visit, addressed by visit and detector id."""

    model: PhotometricTransform
    visits: np.ndarray  # (v,) visit ids, in model group order
    detectors: np.ndarray  # (d,) detector ids
    ccd_visits: np.ndarray  # (k, 2) (visit, detector) ids
    bands: tuple[str, ...]  # band names
    visit_band: np.ndarray  # (v,) index into `bands`
    band_detectors: np.ndarray  # (g, 2) (band index, detector index) of each "band_detector" group
    colour_slope_errors: np.ndarray | None = None  # (bands,) 1-sigma error of each fitted c1 (0: fixed)

    def colour_terms(self) -> dict[str, dict[str, Any]]:
        """{band: {primary, secondary, c0, c1, c1_err, c2, fitted}} of the bands with a colour term."""
        if not isinstance(self.model, WithColourTerms):
            return {}
        c = self.model.colour
        errors = self.colour_slope_errors if self.colour_slope_errors is not None else np.zeros(len(self.bands))
        return {band: {"primary": c.primary[b], "secondary": c.secondary[b], "c0": float(c.offset[b]),
                       "c1": float(c.slope[b]), "c1_err": float(errors[b]), "c2": float(c.curvature[b]),
                       "fitted": bool(c.fitted[b])}
                for b, band in enumerate(self.bands) if c.active[b]}

    def index(self, visit, detector) -> dict[str, jax.Array]:
        """Group indices of (visit, detector) ids; KeyError for what the model cannot evaluate."""
        visit, detector = np.broadcast_arrays(np.asarray(visit, np.int64), np.asarray(detector, np.int64))
        visit, detector = visit.ravel(), detector.ravel()
        used = _group_keys_used(self.model)
        vi = np.clip(np.searchsorted(self.visits, visit), 0, len(self.visits) - 1)
        di = np.clip(np.searchsorted(self.detectors, detector), 0, len(self.detectors) - 1)
        ok_v, ok_d = self.visits[vi] == visit, self.detectors[di] == detector
        keys = self.ccd_visits[:, 0] * (1 << 32) + self.ccd_visits[:, 1]
        ki = np.clip(np.searchsorted(keys, visit * (1 << 32) + detector), 0, len(keys) - 1)
        ok_k = keys[ki] == visit * (1 << 32) + detector
        n_det = len(self.detectors)
        bd_keys = self.band_detectors[:, 0] * n_det + self.band_detectors[:, 1]
        want = self.visit_band[vi] * n_det + di
        gi = np.clip(np.searchsorted(bd_keys, want), 0, len(bd_keys) - 1)
        ok_g = bd_keys[gi] == want
        ok = np.ones(visit.shape, bool)
        if "ccd_visit" in used:
            ok &= ok_k
        if used & {"visit", "band_detector"}:
            ok &= ok_v
        if "detector" in used:
            ok &= ok_d
        if "band_detector" in used:
            ok &= ok_g
        if not np.all(ok):
            bad = np.flatnonzero(~ok)[0]
            raise KeyError(f"(visit, detector) = ({visit[bad]}, {detector[bad]}) cannot be evaluated: it was not "
                           "part of the photometric fit")
        return {"visit": jnp.asarray(vi), "detector": jnp.asarray(di), "ccd_visit": jnp.asarray(ki),
                "band_detector": jnp.asarray(gi)}

    def evaluate(self, visit, detector, x, y, xp=None) -> tuple[Any, Any]:
        """(calibration nJy/count, zero point AB mag of one count); arguments broadcast together.

        xp: None evaluates with JAX; an array namespace (numpy) evaluates without JAX."""
        visit, detector, x, y = np.broadcast_arrays(visit, detector, np.asarray(x, float), np.asarray(y, float))
        index = self.index(visit, detector)
        if xp is not None and xp is not jnp:
            value = jm.evaluate(self.model, {k: np.asarray(v) for k, v in index.items()}, x.ravel(), y.ravel(), xp=xp)
            kind = self.model.kind
            return (xp.reshape(jm.to_calibration(value, kind), x.shape),
                    xp.reshape(jm.to_zero_point(value, kind), x.shape))
        c, z = evaluate_calibration(self.model, index, jnp.asarray(x.ravel()), jnp.asarray(y.ravel()))
        return np.asarray(c).reshape(x.shape), np.asarray(z).reshape(x.shape)

    def calibration(self, visit, detector, x, y, xp=None) -> np.ndarray:
        """nJy per count at 0-based pixels of detector-visits (by id): calibrated flux = instFlux x this."""
        return self.evaluate(visit, detector, x, y, xp)[0]

    def zero_point(self, visit, detector, x, y, xp=None) -> np.ndarray:
        """AB magnitude of one count: 31.4 - 2.5 log10(calibration)."""
        return self.evaluate(visit, detector, x, y, xp)[1]

    def save(self, path: str | Path) -> None:
        """Write `<path>.json` (model tree and ids) and `<path>.eqx` (array leaves, no pickle)."""
        meta = {"kind": "photometry", "visits": self.visits.tolist(),
                "detectors": self.detectors.tolist(), "ccd_visits": self.ccd_visits.tolist(),
                "bands": list(self.bands), "visit_band": self.visit_band.tolist(),
                "band_detectors": self.band_detectors.tolist()}
        if self.colour_slope_errors is not None:
            meta["colour_slope_errors"] = np.asarray(self.colour_slope_errors, float).tolist()
            meta["colour_terms"] = self.colour_terms()  # for reading; the values reload from the .eqx
        jm.save_form(path, self.model, meta)

    @classmethod
    def load(cls, path: str | Path, like: PhotometricTransform | None = None) -> "PhotometricSolution":
        """Reload `save`'s files, checked whole first (`jcal.solution.read_solution`)."""
        model, meta, ids = read_solution(path, like, PHOTOMETRY_IDS, ("ccd_visits", "band_detectors"), _check_bands)
        errors = meta.get("colour_slope_errors")
        return cls(model, ids["visits"], ids["detectors"], ids["ccd_visits"], tuple(meta["bands"]),
                   np.array(meta["visit_band"], np.int64), ids["band_detectors"],
                   None if errors is None else np.array(errors, float))


def save_photometric_model(solution, path: str | Path) -> None:
    """Save a fitted photometric model (a `PhotometricSolution`, or a `PhotometryFit`'s or
    `FitResult`'s) as `<path>.json` + `<path>.eqx`; `load_photometric_model(path)` reloads it."""
    solution = getattr(solution, "photometry", solution)
    solution = getattr(solution, "solution", solution)
    if not isinstance(solution, PhotometricSolution):
        raise TypeError(f"save_photometric_model takes a PhotometricSolution, PhotometryFit or FitResult with "
                        f"photometry, not {type(solution).__name__}")
    solution.save(path)


def load_photometric_model(path: str | Path, like: PhotometricTransform | None = None) -> PhotometricSolution:
    """Reload `OUT/photometry_model` written by `PhotometryFit.write` (or `PhotometricSolution.save`)."""
    return PhotometricSolution.load(path, like)

