"""Starting values of the astrometric model forms, from the first-guess WCS of every detector-visit.

Linear least squares on a grid of pixels per detector-visit evaluated through its WCS
(astropy, once, on the host). Nothing here is differentiated: the fit refines it all.
"""

from __future__ import annotations

import numpy as np

import jcal_models as jm
from jcal_models import Polynomial, sky_to_tangent

from ..associate import Association
from ..sky import to_radec, unit_vectors
from ..config import FitConfig
from ..data import InputData

GRID = 8  # samples per axis and detector


def _sample_grid(nx: int, ny: int) -> tuple[np.ndarray, np.ndarray]:
    gx, gy = np.meshgrid(np.linspace(-0.5, nx - 0.5, GRID), np.linspace(-0.5, ny - 0.5, GRID))
    return gx.ravel(), gy.ravel()


def visit_tangent_points(data: InputData, visits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ra, dec) per visit: mean direction of its detectors' centres through their first-guess WCS."""
    ra0, dec0 = np.zeros(len(visits)), np.zeros(len(visits))
    for i, v in enumerate(visits):
        centres = [cv.wcs.all_pix2world([[(cv.nx - 1) / 2, (cv.ny - 1) / 2]], 0)[0]
                   for (vv, _), cv in data.ccd_visits.items() if vv == v]
        ra, dec = to_radec(unit_vectors(*np.array(centres).T).mean(axis=0, keepdims=True))
        ra0[i], dec0[i] = ra[0], dec[0]
    return ra0, dec0


def _samples(data: InputData, assoc: Association, ra0, dec0):
    """Per detector-visit grid: pixel (x, y) and tangent-plane (xi, eta) of its visit [deg]."""
    out = []
    for k, (v, d) in enumerate(assoc.ccd_visits):
        vi = int(np.searchsorted(assoc.visits, v))
        cv = data.ccd_visits[(int(v), int(d))]
        x, y = _sample_grid(cv.nx, cv.ny)
        ra, dec = cv.wcs.all_pix2world(x, y, 0)
        if assoc.alignment is not None:  # the first guess as association corrected it
            ra, dec = assoc.alignment.apply_one(int(v), int(d), ra, dec)
        xi, eta = sky_to_tangent(ra, dec, ra0[vi], dec0[vi], xp=np)
        out.append((k, vi, int(np.searchsorted(assoc.detectors, d)), x, y, xi, eta))
    return out


def _lstsq(design: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """(2, terms) least-squares coefficients for both outputs."""
    return np.linalg.lstsq(design, np.stack([u, v], 1), rcond=None)[0].T


def _detector_domains(data: InputData, assoc: Association):
    size = {}
    for (v, d), cv in data.ccd_visits.items():
        size.setdefault(d, (cv.nx, cv.ny))
    nxy = np.array([size[int(d)] for d in assoc.detectors], float)
    return np.stack([(nxy[:, 0] - 1) / 2, (nxy[:, 1] - 1) / 2], 1), nxy / 2


def initial_astrometric_model(data: InputData, assoc: Association, config: FitConfig) -> jm.Transform:
    ra0, dec0 = visit_tangent_points(data, assoc.visits)
    samples = _samples(data, assoc, ra0, dec0)
    chip_center, chip_half = _detector_domains(data, assoc)
    if config.astrometry_model == "simple":
        order = config.simple_order
        coeffs = np.zeros((len(assoc.ccd_visits), 2, jm.n_terms(order)))
        centers = chip_center[[s[2] for s in samples]]
        halves = chip_half[[s[2] for s in samples]]
        for (k, vi, di, x, y, xi, eta) in samples:
            coeffs[k] = _lstsq(Polynomial.design(x, y, chip_center[di], chip_half[di], order), xi, eta)
        return jm.simple_astrometry(coeffs, centers, halves, order, ra0, dec0)
    model = _constrained(samples, assoc, config, chip_center, chip_half, ra0, dec0)
    if config.astrometry_model == "radial":  # the shared distortion starts at 0; the fit finds it
        return jm.extra.radial_astrometry(model)
    return model


def _constrained(samples, assoc, config, chip_center, chip_half, ra0, dec0):
    """Chips: affine-or-higher fit in a focal frame = visit tangent plane de-rotated by the
    visit's sky angle (consistent across dithers); visits: fit from that frame to the sky."""
    n_vis, n_det = len(assoc.visits), len(assoc.detectors)
    angles = [[] for _ in range(n_vis)]
    for (k, vi, di, x, y, xi, eta) in samples:
        a = Polynomial.design(x, y, chip_center[di], chip_half[di], 1)
        c = _lstsq(a, xi, eta)  # columns: 1, x, y
        angles[vi].append(np.arctan2(c[1, 1], c[0, 1]))
    theta = np.array([np.angle(np.mean(np.exp(1j * np.array(a)))) for a in angles])

    def focal(vi, xi, eta):
        c, s = np.cos(-theta[vi]), np.sin(-theta[vi])
        return c * xi - s * eta, s * xi + c * eta

    chip_order, visit_order = config.chip_order, config.visit_order
    chip = np.zeros((n_det, 2, jm.n_terms(chip_order)))
    for di in range(n_det):
        rows = [s for s in samples if s[2] == di]
        design = np.concatenate([Polynomial.design(s[3], s[4], chip_center[di], chip_half[di], chip_order)
                                 for s in rows])
        u, v = zip(*[focal(s[1], s[5], s[6]) for s in rows])
        chip[di] = _lstsq(design, np.concatenate(u), np.concatenate(v))

    def chip_map(di, x, y):
        b = np.asarray(Polynomial.design(x, y, chip_center[di], chip_half[di], chip_order))
        return b @ chip[di, 0], b @ chip[di, 1]

    focal_xy = {s[0]: chip_map(s[2], s[3], s[4]) for s in samples}
    all_u = np.concatenate([f[0] for f in focal_xy.values()])
    all_v = np.concatenate([f[1] for f in focal_xy.values()])
    f_center = np.array([(all_u.max() + all_u.min()) / 2, (all_v.max() + all_v.min()) / 2])
    f_half = np.maximum(np.array([np.ptp(all_u), np.ptp(all_v)]) / 2, 1e-6) * 1.05
    visit = np.zeros((n_vis, 2, jm.n_terms(visit_order)))
    for vi in range(n_vis):
        rows = [s for s in samples if s[1] == vi]
        design = np.concatenate([Polynomial.design(*focal_xy[s[0]], f_center, f_half, visit_order) for s in rows])
        visit[vi] = _lstsq(design, np.concatenate([s[5] for s in rows]), np.concatenate([s[6] for s in rows]))

    # gauge: the detector seen in most visits, nearest the focal-plane centre
    n_seen = np.bincount(np.searchsorted(assoc.detectors, assoc.ccd_visits[:, 1]), minlength=n_det)
    centre_dist = np.hypot(chip[:, 0, 0] - f_center[0], chip[:, 1, 0] - f_center[1])
    reference = int(np.lexsort((centre_dist, -n_seen))[0])
    return jm.constrained_astrometry(
        chip, chip_center, chip_half, chip_order,
        visit, np.tile(f_center, (n_vis, 1)), np.tile(f_half, (n_vis, 1)), visit_order,
        ra0, dec0, reference)
