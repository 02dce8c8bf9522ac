"""Input screening before association: duplicates, detections off their detector, far-off WCSs.

`screen_input(data, config)` runs before `jcal.associate` (in `jcal.fit` and the Task facade)
and handles three kinds of bad input that association cannot be robust to by itself:

- **duplicate detections**: two rows of one detector-visit with the same ``source_id``, or at
  exactly the same pixel position (a catalog ingested twice). Left in, they look like two
  stars seen by one visit, which association must split apart, cutting real stars.
- **detections outside their detector**: pixel positions beyond the detector's bounds by more
  than ``config.outside_margin_pixels`` (a corrupt centroid, a wrong detector id).
- **far-off first-guess WCSs**: a detector-visit whose footprint has no reference star and no
  other visit's detector near it (a CRVAL off by degrees, a visit's WCS from another field).
  Its detections match nothing; left in, its parameters are unconstrained and the fit fails
  with a singular system, or the visit silently vanishes from the outputs.

Each is, by configuration (``duplicate_detections``, ``outside_detector``, ``far_off_wcs``:
"drop" or "error"), dropped with a warning naming what was dropped and a count in
``metrics.json`` (``input_screening``), or rejected with an `InputError` naming it.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
from scipy.spatial import cKDTree

from jcal.arrays import unique_rows
from jcal.config import FitConfig
from jcal.data import InputData, InputError
from jcal.sky import angle, unit_vectors

__all__ = ["screen_input"]

log = logging.getLogger("jcal.screen")

_NAMED = 10  # items named in one message
_NEAR = 2.0  # "near": within this many times the two footprints' radii


def _pairs(keys) -> str:
    keys = [tuple(int(v) for v in k) for k in keys]
    more = f" and {len(keys) - _NAMED} more" if len(keys) > _NAMED else ""
    return ", ".join(f"(visit={v}, detector={d})" for v, d in keys[:_NAMED]) + more


_TASK_NAMES = {"duplicate_detections": "duplicateSources", "outside_detector": "outsideDetector",
               "far_off_wcs": "farOffWcs"}  # the Task facade's (and CLI's --set) names


def _handle(mode: str, option: str, message: str) -> None:
    """Raise InputError (mode "error") or warn (mode "drop") with a message naming the option."""
    names = f"FitConfig.{option}, --set {_TASK_NAMES[option]}"
    if mode == "error":
        raise InputError(f"{message}; rejected as configured ({names}=error; 'drop' drops them with a warning)")
    log.warning("%s; dropped as configured (%s=drop; 'error' rejects them)", message, names)


def _report_rows(s, bad: np.ndarray, mode: str, option: str, what: str) -> int:
    """Warn about (or reject, by `mode`) the source rows `bad`, naming ids and detector-visits; their count."""
    if bad.any():
        where = np.stack([s.visit[bad], s.detector[bad]], axis=1)
        _handle(mode, option, f"sources: {int(bad.sum())} {what}: source_id {s.source_id[bad][:_NAMED].tolist()} "
                              f"on {_pairs(where[unique_rows(where)[0]])}")
    return int(bad.sum())


def _repeated(cols: list[np.ndarray]) -> np.ndarray:
    """(n,) bool: rows whose int64 values in all `cols` equal those of another row. A hash of the
    row finds the candidates (one sort of n integers); they are then compared exactly."""
    n = cols[0].shape[0]
    h = np.zeros(n, np.uint64)
    for c in cols:  # wrapping multiply-xor (numpy arrays wrap silently)
        h = (h ^ c.view(np.uint64)) * np.uint64(0x9E3779B97F4A7C15)
    _, inverse, counts = np.unique(h, return_inverse=True, return_counts=True)
    out = np.zeros(n, dtype=bool)
    cand = np.flatnonzero(counts[inverse.ravel()] > 1)
    if cand.size:
        _, exact = unique_rows(np.stack([c[cand] for c in cols], axis=1))
        out[cand] = np.bincount(exact)[exact] > 1
    return out


def _duplicates(data: InputData) -> np.ndarray:
    """(n,) bool: rows repeating another row of the same detector-visit (same source_id, or the
    same x and y bit for bit) that comes first in a content-based order, so that the result
    ignores the row order."""
    s = data.sources
    by_id = [s.visit, s.detector, s.source_id]
    by_xy = [s.visit, s.detector, s.x.view(np.int64), s.y.view(np.int64)]
    dup = np.zeros(len(s), dtype=bool)
    rows = np.flatnonzero(_repeated(by_id) | _repeated(by_xy))
    if rows.size == 0:
        return dup
    rows = rows[np.lexsort((s.inst_flux[rows], s.x[rows], s.y[rows], s.source_id[rows], s.detector[rows],
                            s.visit[rows]))]
    for cols in (by_id, by_xy):
        first, _ = unique_rows(np.stack([c[rows] for c in cols], axis=1))
        later = np.ones(rows.size, dtype=bool)
        later[first] = False
        dup[rows[later]] = True
    return dup


def _outside(data: InputData, margin: float) -> np.ndarray:
    """(n,) bool: detections beyond their detector's bounds by more than `margin` pixels."""
    s = data.sources
    keys = np.stack([s.visit, s.detector], axis=1)
    first, inverse = unique_rows(keys)
    size = np.array([(data.ccd_visits[(int(v), int(d))].nx, data.ccd_visits[(int(v), int(d))].ny)
                     for v, d in keys[first].tolist()], dtype=float).reshape(-1, 2)[inverse]
    lo = -0.5 - margin
    return (s.x < lo) | (s.y < lo) | (s.x > size[:, 0] - 0.5 + margin) | (s.y > size[:, 1] - 0.5 + margin)


def _footprints(data: InputData, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(k, 3) centre unit vectors and (k,) radii (rad, centre to farthest corner) of detector-visits
    through their first-guess WCS; NaN where the WCS gives no finite sky position."""
    centre = np.full((len(keys), 3), np.nan)
    radius = np.full(len(keys), np.nan)
    for i, (visit, detector) in enumerate(keys.tolist()):
        ccd = data.ccd_visits[(visit, detector)]
        px = np.array([(ccd.nx - 1) / 2, -0.5, ccd.nx - 0.5, -0.5, ccd.nx - 0.5])
        py = np.array([(ccd.ny - 1) / 2, -0.5, -0.5, ccd.ny - 0.5, ccd.ny - 0.5])
        try:
            xyz = unit_vectors(*ccd.wcs.all_pix2world(px, py, 0))
        except Exception:  # noqa: BLE001 - a WCS that cannot be evaluated is as bad as a far-off one
            continue
        if np.all(np.isfinite(xyz)):
            centre[i], radius[i] = xyz[0], angle(xyz[:1], xyz[1:]).max()
    return centre, radius


def _far_off(data: InputData, keys: np.ndarray) -> np.ndarray:
    """(k,) bool: detector-visits with no reference star and no other visit's detector near them
    (within twice the footprints' radii), or whose first-guess WCS gives no finite position."""
    centre, radius = _footprints(data, keys)
    ok = np.isfinite(radius)
    far = ~ok
    if not ok.any():
        return far
    idx = np.flatnonzero(ok)
    reach = _NEAR * radius[idx]
    ref_tree = cKDTree(unit_vectors(data.refcat.ra, data.refcat.dec))
    has_ref = ref_tree.query_ball_point(centre[idx], 2 * np.sin(np.minimum(reach, np.pi) / 2),
                                        return_length=True) > 0
    tree = cKDTree(centre[idx])
    biggest = radius[idx].max()
    visit = keys[idx, 0]
    for j, (c, r) in enumerate(zip(centre[idx], radius[idx])):
        if has_ref[j]:
            continue
        cand = np.asarray(tree.query_ball_point(c, 2 * np.sin(min(_NEAR * (r + biggest), np.pi) / 2)), dtype=np.int64)
        cand = cand[visit[cand] != visit[j]]
        near = angle(np.broadcast_to(c, (cand.size, 3)), centre[idx][cand]) < _NEAR * (r + radius[idx][cand])
        far[idx[j]] = not near.any()
    return far


def screen_input(data: InputData, config: FitConfig) -> tuple[InputData, dict]:
    """`data` without duplicate detections, detections off their detector and far-off
    detector-visits (or InputError, as `config` says), and a summary for metrics.json:
    ``{"duplicate_detections", "outside_detector", "far_off_ccd_visits": n,
    "excluded_ccd_visits": [[visit, detector], ...]}``."""
    s = data.sources
    keep = np.ones(len(s), dtype=bool)
    summary: dict = {}

    outside = _outside(data, config.outside_margin_pixels)
    summary["outside_detector"] = _report_rows(
        s, outside, config.outside_detector, "outside_detector",
        f"detection(s) lie more than {config.outside_margin_pixels:g} pixels outside their detector")
    keep &= ~outside
    dup = _duplicates(data) & keep
    summary["duplicate_detections"] = _report_rows(
        s, dup, config.duplicate_detections, "duplicate_detections",
        "duplicate detection(s) (same detector-visit and source_id, or the same x and y)")
    keep &= ~dup

    keys_all = np.stack([s.visit, s.detector], axis=1)
    first, inverse = unique_rows(keys_all[keep])
    keys = keys_all[keep][first]
    far = _far_off(data, keys)
    excluded = keys[far]
    summary["far_off_ccd_visits"] = int(far.sum())
    summary["excluded_ccd_visits"] = excluded.tolist()
    if far.any():
        if far.all():
            raise InputError(f"wcs: no detector-visit has a reference star or another visit near its first-guess "
                             f"footprint ({len(keys)} detector-visits): the first-guess WCSs and the reference "
                             "catalog do not cover the same sky")
        _handle(config.far_off_wcs, "far_off_wcs",
                f"wcs: {int(far.sum())} detector-visit(s) have a first-guess WCS far from everything else (no "
                f"reference star and no other visit near their footprint; a wrong CRVAL?): {_pairs(excluded)}")
        rows = np.flatnonzero(keep)
        keep[rows[far[inverse]]] = False

    if keep.all():
        return data, summary
    if not keep.any():
        raise InputError("sources: no detection is left after screening (see the warnings above)")
    gone = {tuple(k) for k in excluded.tolist()}
    return dataclasses.replace(data, sources=s.take(np.flatnonzero(keep)),
                               ccd_visits={k: v for k, v in data.ccd_visits.items() if k not in gone}), summary
