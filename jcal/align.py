"""Alignment of the first-guess WCSs on the reference catalog, before any matching.

A first guess off by more than the match radius (a few arcsec is common: a pointing error, a
rotator offset, a stale distortion model) leaves a visit's detections unmatched to the reference
catalog and to the other visits. `align` estimates, robustly and without any match yet:

1. per visit, the offset between its detections and the reference stars (carried to the visit's
   epoch): a vote over all detection-reference pair offsets within `radius` (a 2-d histogram,
   smoothed over 3 x 3 bins, its peak), then an affine correction (shift, rotation, scale, shear)
   of the visit's tangent plane fitted to the pairs near the peak, tightening the window thrice;
2. per detector-visit, the remaining shift: the median offset of its pairs within a small window
   (held at zero when fewer than `MIN_PAIRS` pairs support it).

The result, an `Alignment`, corrects sky positions computed through the first-guess WCSs
(`Alignment.apply`); association and the starting astrometric model both use it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

from jcal_models import sky_to_tangent, tangent_to_sky

from .sky import to_radec, unit_vectors

log = logging.getLogger("jcal.align")

BIN_ARCSEC = 0.5  # vote histogram bin
WINDOWS_ARCSEC = (1.5, 0.8, 0.4)  # successive windows of the visit's affine fit around the current solution
CCD_WINDOW_ARCSEC = (2.0, 0.8, 0.4)  # windows of a detector-visit's median shift
MIN_PAIRS = 5  # pairs needed for a detector-visit's own shift
MIN_AFFINE_PAIRS = 20  # below this a visit gets a shift only
NEIGHBOURS = 6  # reference stars examined per detection


@dataclass(frozen=True)
class Alignment:
    """Corrections of first-guess sky positions; see the module docstring.

    Visit v: tangent point (ra0[v], dec0[v]) and affine (2, 3) acting on (1, xi, eta) [arcsec] giving
    the correction [arcsec] in that plane; detector-visit key (visit, detector) -> extra shift [arcsec].
    """

    visits: np.ndarray  # (v,) visit ids, sorted
    ra0: np.ndarray  # (v,) deg
    dec0: np.ndarray
    affine: np.ndarray  # (v, 2, 3)
    ccd_keys: np.ndarray  # (k, 2) (visit, detector), sorted
    ccd_shift: np.ndarray  # (k, 2) arcsec
    pairs: np.ndarray  # (v,) pairs supporting each visit's solution (after the last window)

    def apply(self, visit: np.ndarray, ccd: np.ndarray, ra: np.ndarray, dec: np.ndarray):
        """Corrected (ra, dec) [deg] of positions in detector-visits `ccd` (rows of ccd_keys, -1: none)
        of visits `visit` (ids; a visit not aligned is left unchanged)."""
        ra, dec = np.array(ra, float, copy=True), np.array(dec, float, copy=True)
        visit, ccd = np.broadcast_to(visit, ra.shape), np.broadcast_to(ccd, ra.shape)
        for vi, v in enumerate(self.visits.tolist()):
            rows = np.flatnonzero(visit == v)
            if rows.size == 0:
                continue
            xi, eta = (3600.0 * np.asarray(c) for c in
                       sky_to_tangent(ra[rows], dec[rows], self.ra0[vi], self.dec0[vi], xp=np))
            a = self.affine[vi]
            k = ccd[rows]
            shift = np.where((k >= 0)[:, None], self.ccd_shift[np.maximum(k, 0)], 0.0)
            xi, eta = (xi + a[0, 0] + a[0, 1] * xi + a[0, 2] * eta + shift[:, 0],
                       eta + a[1, 0] + a[1, 1] * xi + a[1, 2] * eta + shift[:, 1])
            ra[rows], dec[rows] = tangent_to_sky(xi / 3600.0, eta / 3600.0, self.ra0[vi], self.dec0[vi], xp=np)
        return ra, dec

    def apply_one(self, visit: int, detector: int, ra, dec):
        """As `apply`, for positions of one detector-visit given by ids."""
        hit = np.flatnonzero((self.ccd_keys[:, 0] == visit) & (self.ccd_keys[:, 1] == detector))
        return self.apply(np.int64(visit), np.int64(hit[0] if hit.size else -1), np.asarray(ra), np.asarray(dec))

    def summary(self) -> dict:
        """Per visit: shift [arcsec], rotation [arcsec at 1 deg], scale [ppm]; worst detector shift."""
        shift = np.hypot(self.affine[:, 0, 0], self.affine[:, 1, 0])
        rot = (self.affine[:, 1, 1] - self.affine[:, 0, 2]) / 2 * 3600.0
        scale = (self.affine[:, 0, 1] + self.affine[:, 1, 2]) / 2 * 1e6
        return {"visit_shift_arcsec": dict(zip(self.visits.tolist(), np.round(shift, 3).tolist())),
                "visit_rotation_arcsec_at_1deg": dict(zip(self.visits.tolist(), np.round(rot, 3).tolist())),
                "visit_scale_ppm": dict(zip(self.visits.tolist(), np.round(scale, 1).tolist())),
                "max_ccd_shift_arcsec": float(np.hypot(*self.ccd_shift.T).max(initial=0.0))}


def _vote(d: np.ndarray, radius: float) -> np.ndarray:
    """Peak (2,) [arcsec] of the pair offsets d (n, 2): histogram smoothed over 3 x 3 bins."""
    n_bins = int(np.ceil(2 * radius / BIN_ARCSEC))
    hist, ex, ey = np.histogram2d(d[:, 0], d[:, 1], bins=n_bins, range=[[-radius, radius]] * 2)
    padded = np.pad(hist, 1)
    smooth = sum(padded[i:i + n_bins, j:j + n_bins] for i in range(3) for j in range(3))
    i, j = np.unravel_index(np.argmax(smooth), smooth.shape)
    return np.array([(ex[i] + ex[i + 1]) / 2, (ey[j] + ey[j + 1]) / 2])


def _fit_visit(p: np.ndarray, d: np.ndarray, radius: float) -> tuple[np.ndarray, int]:
    """Affine (2, 3) correction of one visit from detection positions p (n, 2) and pair offsets d (n, 2)."""
    affine = np.zeros((2, 3))
    if d.shape[0] == 0:
        return affine, 0
    affine[:, 0] = _vote(d, radius)
    design = np.column_stack([np.ones(len(p)), p])
    near = np.zeros(len(p), bool)
    for window in WINDOWS_ARCSEC:
        near = np.hypot(*(d - design @ affine.T).T) < window
        if near.sum() >= MIN_AFFINE_PAIRS:
            affine = np.linalg.lstsq(design[near], d[near], rcond=None)[0].T
        elif near.any():
            affine = np.zeros((2, 3))
            affine[:, 0] = np.median(d[near], axis=0)
    return affine, int(near.sum())


def _ccd_shifts(resid: np.ndarray, ccd: np.ndarray, n_ccd: int) -> np.ndarray:
    """(n_ccd, 2) median remaining shift per detector-visit (0 where fewer than MIN_PAIRS pairs)."""
    shift = np.zeros((n_ccd, 2))
    order = np.argsort(ccd, kind="stable")
    bounds = np.searchsorted(ccd[order], np.arange(n_ccd + 1))
    for k in range(n_ccd):
        r = resid[order[bounds[k]:bounds[k + 1]]]
        centre = np.zeros(2)
        for window in CCD_WINDOW_ARCSEC:
            sel = np.hypot(*(r - centre).T) < window
            if sel.sum() < MIN_PAIRS:
                break
            centre = np.median(r[sel], axis=0)
        else:
            shift[k] = centre
    return shift


def align(visit: np.ndarray, ccd: np.ndarray, ccd_keys: np.ndarray, ra: np.ndarray, dec: np.ndarray,
          visit_ids: np.ndarray, visit_epochs: np.ndarray, ref_ra: np.ndarray, ref_dec: np.ndarray,
          ref_epoch: np.ndarray, pmra: np.ndarray, pmdec: np.ndarray, radius_arcsec: float) -> Alignment:
    """Estimate the `Alignment` of detections (visit id, detector-visit index into ccd_keys, first-guess
    ra/dec in deg) on the reference catalog (positions at ref_epoch, proper motions in mas/yr, NaN if
    unknown); pairs are sought within `radius_arcsec`. `visit_ids`/`visit_epochs`: decimal-year epochs."""
    from .associate import _carry  # noqa: PLC0415 - associate imports this module

    has_pm = np.isfinite(pmra) & np.isfinite(pmdec)
    pmra, pmdec = np.where(has_pm, pmra, 0.0), np.where(has_pm, pmdec, 0.0)
    ref_xyz = unit_vectors(ref_ra, ref_dec)
    ref_tree = cKDTree(ref_xyz)
    visits = np.unique(visit)
    n_ccd = len(ccd_keys)
    ra0, dec0 = np.zeros(len(visits)), np.zeros(len(visits))
    affine, support = np.zeros((len(visits), 2, 3)), np.zeros(len(visits), np.int64)
    resid_all, ccd_all = [np.zeros((0, 2))], [np.zeros(0, np.int64)]
    chord = 2 * np.sin(np.radians(radius_arcsec / 3600.0) / 2)
    for vi, v in enumerate(visits):
        rows = np.flatnonzero(visit == v)
        xyz = unit_vectors(ra[rows], dec[rows])
        r0, d0 = to_radec(xyz.mean(axis=0, keepdims=True))
        ra0[vi], dec0[vi] = r0[0], d0[0]
        cap = np.max(np.linalg.norm(xyz - unit_vectors(r0, d0), axis=1)) + 2 * chord
        cand = np.asarray(ref_tree.query_ball_point(unit_vectors(r0, d0)[0], cap), dtype=np.int64)
        if cand.size == 0:
            continue
        epoch = float(visit_epochs[np.searchsorted(visit_ids, v)])
        moved = _carry(ref_xyz[cand], pmra[cand], pmdec[cand], epoch - ref_epoch[cand])
        k = min(NEIGHBOURS, cand.size)
        dist, j = cKDTree(moved).query(xyz, k=k, distance_upper_bound=chord)
        dist, j = dist.reshape(len(rows), k), j.reshape(len(rows), k)
        i = np.broadcast_to(np.arange(len(rows))[:, None], j.shape)[j < cand.size]
        j = j[j < cand.size]
        p = 3600.0 * np.stack(sky_to_tangent(ra[rows], dec[rows], ra0[vi], dec0[vi], xp=np), 1)
        rr, rd = to_radec(moved)
        q = 3600.0 * np.stack(sky_to_tangent(rr, rd, ra0[vi], dec0[vi], xp=np), 1)
        d = q[j] - p[i]
        affine[vi], support[vi] = _fit_visit(p[i], d, radius_arcsec)
        if support[vi] < MIN_AFFINE_PAIRS:  # no clear peak: keep the first guess of this visit
            affine[vi] = 0.0
        resid_all.append(d - np.column_stack([np.ones(len(i)), p[i]]) @ affine[vi].T)
        ccd_all.append(ccd[rows][i])
    shift = _ccd_shifts(np.concatenate(resid_all), np.concatenate(ccd_all), n_ccd)
    out = Alignment(visits, ra0, dec0, affine, ccd_keys, shift, support)
    s = out.summary()
    log.info("alignment on the reference catalog (pairs within %g arcsec): visit shifts up to %.3g arcsec, "
             "detector-visit shifts up to %.3g arcsec", radius_arcsec, max(s["visit_shift_arcsec"].values()),
             s["max_ccd_shift_arcsec"])
    weak = visits[support < MIN_AFFINE_PAIRS]
    if weak.size:
        log.info("alignment: visit(s) %s have fewer than %d pairs near their offset peak: first guess "
                    "kept as it is for them", weak.tolist(), MIN_AFFINE_PAIRS)
    return out
