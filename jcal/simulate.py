"""Simulated multi-visit mosaic-camera data with known truth, for tests, demos and benchmarks.

`simulate` builds an `InputData` (exactly what a reader produces) together with a `Truth`
that the fitter never sees, so that a fit's astrometric and photometric accuracy can be
measured against the answer.

The astrometric truth lies exactly in the model family jcal fits (the "constrained"
model): for detector d in visit v ::

    pixel (x, y) --affine_d--> focal plane (mm) --P_v--> tangent plane (xi, eta) (deg)
                 --inverse gnomonic (TAN) about the visit pointing--> (ra, dec)

where affine_d places the detector (nominal grid + a few-pixel offset + ~1e-4 rad rotation)
and P_v is a polynomial of total order 3: plate scale x sky rotation x parity flip x radial
cubic distortion r' = r (1 + k r^2) (shared by all visits), plus a per-visit low-order
(constant + affine + quadratic) perturbation of <~0.1 arcsec standing for pointing error and
atmosphere. Polynomial coefficients use the monomial order `MONOMIALS`.

The sky: stars uniform on a spherical cap covering the dithered field, with Gaussian proper
motions and ZERO parallax, magnitudes from a power-law number count. Positions are given at
`SimConfig.ref_epoch` (2016.0) and moved linearly: dec(t) = dec + pmdec dt,
ra(t) = ra + pmra dt / cos(dec) (second-order terms are < 1e-9 arcsec here).

Photometry: a detection's instrumental flux is true flux / calibration, where the
calibration (nJy per count) is a per-visit zero point (~0.1 mag) x a per-detector constant
(~2 %) x a smooth per-visit quadratic field over the focal plane (<= 1 %), with
Poisson + background noise. Centroid errors are FWHM / (2.355 S/N) with a floor, and the
catalog reports the true errors. A small fraction of detections are gross outliers.

Colour terms (`SimConfig.colour_terms`, default none): the reference catalog's band b differs
from the instrument's band b by c1_b x colour, mag_instrument = mag_ref(b) + c1_b (mag_ref(b) -
mag_ref(b')), b' the next band of `bands_unique` (cyclically): detections follow the instrument
magnitudes (`TrueStars.mag`), the reference catalog the reference ones (`TrueStars.ref_mag`).

Everything is vectorised numpy, one visit at a time, so the large presets stay fast and
memory-lean. Random streams are split per component (camera, visits, stars, reference
catalog, calibration, first-guess WCS, and the detections of each visit), so changing one
setting perturbs the other components as little as possible. Same config + seed: identical
output.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from astropy.wcs import WCS, Sip

from jcal.data import Camera, CcdVisit, InputData, ReferenceCatalog, SourceCatalog, VisitTable
from jcal.io.atomic import atomic_output_dir
from jcal.io.input_dir import AB_ZERO_POINT_NJY, write_input_files

__all__ = [
    "SimConfig", "PRESETS", "Simulation", "Truth", "TrueStars", "TrueMeasurements", "TrueCcdVisits",
    "MONOMIALS", "simulate", "write_simulation", "read_truth", "tangent_plane", "inverse_tangent_plane",
]

# Monomials x^i y^j of total order <= 3, in the order of every coefficient array here.
MONOMIALS: tuple[tuple[int, int], ...] = (
    (0, 0), (1, 0), (0, 1), (2, 0), (1, 1), (0, 2), (3, 0), (2, 1), (1, 2), (0, 3))
_MJD_J2000 = 51544.5


@dataclass(frozen=True)
class SimConfig:
    """Every knob of the simulation; presets in `PRESETS`, override with `dataclasses.replace`."""

    # Camera: a grid of n_det_x x n_det_y detectors of det_nx x det_ny pixels.
    n_det_x: int = 3
    n_det_y: int = 3
    det_nx: int = 1024
    det_ny: int = 1024
    pixel_size_mm: float = 0.010
    pixel_scale_arcsec: float = 0.2  # nominal, at the optical axis
    gap_px: float = 60.0  # between neighbouring detectors
    placement_offset_px: float = 3.0  # sigma of each detector's unknown shift (per axis)
    placement_rotation_rad: float = 1e-4  # sigma of each detector's unknown rotation
    # Optics and atmosphere.
    distortion_edge_arcsec: float = 3.0  # radial cubic displacement at the field corner
    visit_perturbation_arcsec: float = 0.1  # per-visit low-order perturbation amplitude
    # Visits.
    n_visits: int = 8
    ra_deg: float = 150.0  # field centre
    dec_deg: float = 2.0
    dither_fraction: float = 0.2  # pointing offsets uniform in +- this x field width / height
    dither_deg: float | None = None  # if set: pointing offsets uniform in +- this (deg) on both axes instead
    rotation_range_deg: float = 90.0  # sky rotation uniform in +- half this
    epoch_start: float = 2021.0  # visits evenly spread over [start, end] (decimal years)
    epoch_end: float = 2025.0
    bands: tuple[str, ...] = ("r", "r", "r", "i")  # visit k is in bands[k % len(bands)]
    first_visit_id: int = 1000  # visit ids are first_visit_id + k (not 0..n-1, on purpose)
    exptime: float = 30.0
    # Stars.
    star_density: float = 1.8e5  # per deg^2, all magnitudes in [mag_min, mag_max]
    mag_min: float = 16.0  # in the first band
    mag_max: float = 24.0
    count_slope: float = 0.3  # d log10 N / d mag
    colour_mean: float = -0.3  # mag(other band) - mag(first band)
    colour_sigma: float = 0.2
    # c1 per band of bands_unique (empty: none): instrument = reference + c1 (ref(b) - ref(next band))
    colour_terms: tuple[float, ...] = ()
    pm_mean_mas: tuple[float, float] = (-2.0, -4.0)  # (pmra*cos dec, pmdec), mas/yr
    pm_sigma_mas: float = 10.0
    # Reference catalog (Gaia-like).
    ref_mag_limit: float = 20.0  # first band
    ref_epoch: float = 2016.0
    ref_position_error_mas: tuple[float, float] = (0.1, 1.0)  # at mag_min .. ref_mag_limit
    ref_pm_error_ratio: float = 1.0  # pm error (mas/yr) = ratio x position error (mas)
    ref_flux_error: float = 0.01  # fractional
    # Detections.
    seeing_fwhm_arcsec: float = 0.8
    depth_mag: float = 23.5  # background-limited 5-sigma depth at the nominal calibration
    instrumental_zero_point: float = 30.0  # mag giving 1 count at the nominal calibration
    centroid_factor: float = 1.0  # sigma = factor * FWHM / (2.355 S/N)
    centroid_floor_px: float = 0.003
    min_snr: float = 5.0  # measured S/N below this: not detected
    outlier_fraction: float = 0.002
    outlier_offset_arcsec: tuple[float, float] = (0.5, 3.0)
    # Photometric calibration truth.
    zero_point_sigma_mag: float = 0.1  # per visit
    detector_gain_sigma: float = 0.02  # per detector, fractional
    # per detector linear gradient: calib x (1 + g_x u + g_y v), u, v in [-1, 1] across the detector
    detector_gradient_sigma: float = 0.0
    field_amplitude: float = 0.01  # per-visit quadratic field, bound on |fractional change|
    # First-guess WCS: the truth perturbed, then fitted with TAN-SIP of order 3.
    wcs_shift_arcsec: tuple[float, float] = (0.5, 1.0)  # uniform magnitude, random direction
    wcs_rotation_sigma_rad: float = 2e-4
    wcs_scale_sigma: float = 2e-4
    wcs_grid: int = 10  # fit grid points per axis
    # per-visit first-guess error on top (all detectors of a visit together, about the pointing):
    wcs_visit_shift_arcsec: tuple[float, float] = (0.0, 0.0)  # uniform magnitude, random direction
    wcs_visit_rotation_sigma_rad: float = 0.0
    wcs_visit_scale_sigma: float = 0.0

    def __post_init__(self):
        for name in ("n_det_x", "n_det_y", "det_nx", "det_ny", "n_visits"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"SimConfig.{name} must be >= 1")
        if not self.bands:
            raise ValueError("SimConfig.bands must name at least one band")
        object.__setattr__(self, "bands", tuple(self.bands))
        for name in ("pm_mean_mas", "ref_position_error_mas", "outlier_offset_arcsec", "wcs_shift_arcsec",
                     "colour_terms", "wcs_visit_shift_arcsec"):
            object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))
        if self.colour_terms and len(self.colour_terms) != len(self.bands_unique):
            raise ValueError(f"SimConfig.colour_terms needs one c1 per band of {self.bands_unique}, "
                             f"got {self.colour_terms}")
        if any(self.colour_terms) and len(self.bands_unique) < 2:
            raise ValueError("SimConfig.colour_terms needs at least two bands (a colour)")

    # Derived geometry ---------------------------------------------------------------------
    @property
    def n_detectors(self) -> int:
        return self.n_det_x * self.n_det_y

    @property
    def plate_scale(self) -> float:
        """Nominal plate scale, deg per mm."""
        return self.pixel_scale_arcsec / 3600.0 / self.pixel_size_mm

    @property
    def pitch_mm(self) -> tuple[float, float]:
        return ((self.det_nx + self.gap_px) * self.pixel_size_mm, (self.det_ny + self.gap_px) * self.pixel_size_mm)

    @property
    def half_size_mm(self) -> tuple[float, float]:
        """Half width / height of the mosaic, mm."""
        px, py = self.pitch_mm
        gap = self.gap_px * self.pixel_size_mm
        return (self.n_det_x * px - gap) / 2, (self.n_det_y * py - gap) / 2

    @property
    def field_radius_mm(self) -> float:
        return float(np.hypot(*self.half_size_mm))

    @property
    def bands_unique(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.bands))

    def colour_term(self, band: str) -> tuple[str, float]:
        """(secondary band, c1) of the simulated colour term of `band` (c1 = 0: none)."""
        bands = self.bands_unique
        k = bands.index(band)
        return bands[(k + 1) % len(bands)], (self.colour_terms[k] if self.colour_terms else 0.0)

    def to_dict(self) -> dict:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "SimConfig":
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()})


# Preset sizes (detections measured with seed 0 are in the module's tests / report).
PRESETS: dict[str, SimConfig] = {
    "tiny": SimConfig(n_det_x=2, n_det_y=2, n_visits=4, star_density=8e4),
    "small": SimConfig(),  # the defaults
    "medium": SimConfig(n_det_x=6, n_det_y=6, det_nx=2048, det_ny=4096, n_visits=10, star_density=1.075e5),
    "large": SimConfig(n_det_x=10, n_det_y=10, det_nx=2048, det_ny=4096, n_visits=30, star_density=1.75e4),
    "huge": SimConfig(n_det_x=10, n_det_y=10, det_nx=2048, det_ny=4096, n_visits=100, star_density=2.6e4),
}
# A survey nobody tuned for (issue 14): pointings dithered by up to half the mosaic, so the outer
# detectors of some visits share stars only with the reference catalog; first guesses off by up to
# ~5 arcsec per visit; 3-year baseline; 1 % gross outliers; per-detector photometric gradients.
_EDGE = dict(n_visits=10, epoch_start=2021.0, epoch_end=2024.0, outlier_fraction=0.01, detector_gradient_sigma=0.01,
             wcs_visit_shift_arcsec=(0.5, 4.0), wcs_visit_rotation_sigma_rad=2e-4, wcs_visit_scale_sigma=2e-4)
PRESETS["edge"] = SimConfig(n_det_x=6, n_det_y=6, det_nx=2048, det_ny=4096, star_density=1.075e5, dither_deg=0.5,
                            **_EDGE)
# Its small, fast variant (tests): 3 x 3 detectors of 1024 x 1024, dithers of half the mosaic.
PRESETS["edge_small"] = SimConfig(star_density=1.8e5, dither_deg=0.09, **_EDGE)


# --------------------------------------------------------------------------------------------
# Geometry helpers (all vectorised; angles in degrees at the interfaces).
# --------------------------------------------------------------------------------------------


def tangent_plane(ra, dec, ra0, dec0) -> tuple[np.ndarray, np.ndarray]:
    """Gnomonic (TAN) projection of (ra, dec) about (ra0, dec0): standard coordinates (xi, eta), deg.

    xi points east (increasing ra), eta north; this is FITS TAN's intermediate world coordinates.
    """
    ra, dec, ra0, dec0 = (np.radians(np.asarray(a, dtype=float)) for a in (ra, dec, ra0, dec0))
    cd, sd, cd0, sd0 = np.cos(dec), np.sin(dec), np.cos(dec0), np.sin(dec0)
    cda = np.cos(ra - ra0)
    cosc = sd0 * sd + cd0 * cd * cda
    xi = cd * np.sin(ra - ra0) / cosc
    eta = (cd0 * sd - sd0 * cd * cda) / cosc
    return np.degrees(xi), np.degrees(eta)


def inverse_tangent_plane(xi, eta, ra0, dec0) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of `tangent_plane`: (xi, eta) in deg about (ra0, dec0) -> (ra, dec) in deg."""
    xi, eta = np.radians(np.asarray(xi, dtype=float)), np.radians(np.asarray(eta, dtype=float))
    ra0, dec0 = np.radians(np.asarray(ra0, dtype=float)), np.radians(np.asarray(dec0, dtype=float))
    denom = np.cos(dec0) - eta * np.sin(dec0)
    ra = ra0 + np.arctan2(xi, denom)
    dec = np.arctan2(np.sin(dec0) + eta * np.cos(dec0), np.hypot(xi, denom))
    return np.degrees(ra) % 360.0, np.degrees(dec)


def _monomials(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(10, *shape) monomials in `MONOMIALS` order."""
    x2, y2 = x * x, y * y
    one = np.ones_like(x)
    return np.stack([one, x, y, x2, x * y, y2, x2 * x, x2 * y, x * y2, y2 * y])


def _poly(c: np.ndarray, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Evaluate a (2, 10) order-3 polynomial map at (x, y) (written out: no (10, n) temporaries)."""
    x2, xy, y2 = x * x, x * y, y * y
    x3, x2y, xy2, y3 = x2 * x, x2 * y, x * y2, y2 * y
    return tuple(k[0] + k[1] * x + k[2] * y + k[3] * x2 + k[4] * xy + k[5] * y2
                 + k[6] * x3 + k[7] * x2y + k[8] * xy2 + k[9] * y3 for k in c)


def _poly_jacobian(c: np.ndarray, x: np.ndarray, y: np.ndarray):
    """d(out)/d(x, y) of a (2, 10) polynomial map: (dXdx, dXdy, dYdx, dYdy)."""
    x2, xy, y2 = x * x, x * y, y * y
    out = []
    for k in c:
        out.append(k[1] + 2 * k[3] * x + k[4] * y + 3 * k[6] * x2 + 2 * k[7] * xy + k[8] * y2)
        out.append(k[2] + k[4] * x + 2 * k[5] * y + k[7] * x2 + 2 * k[8] * xy + 3 * k[9] * y2)
    return tuple(out)


def _invert_poly(c: np.ndarray, u: np.ndarray, v: np.ndarray, tol: float = 1e-12, max_iter: int = 20):
    """Solve P(x, y) = (u, v) for a (2, 10) polynomial with a dominant linear part (Newton).

    Starts from the inverse of the linear part; stops when the step is below `tol` (in the
    units of x, y: mm here, i.e. 1e-10 px) or after `max_iter` steps."""
    lin_inv = np.linalg.inv(c[:, 1:3])
    x = lin_inv[0, 0] * (u - c[0, 0]) + lin_inv[0, 1] * (v - c[1, 0])
    y = lin_inv[1, 0] * (u - c[0, 0]) + lin_inv[1, 1] * (v - c[1, 0])
    for _ in range(max_iter):
        pu, pv = _poly(c, x, y)
        ru, rv = pu - u, pv - v
        a, b, cc, d = _poly_jacobian(c, x, y)
        det = a * d - b * cc
        dx, dy = (d * ru - b * rv) / det, (a * rv - cc * ru) / det
        x, y = x - dx, y - dy
        if x.size == 0 or max(np.abs(dx).max(), np.abs(dy).max()) < tol:
            break
    return x, y


def _field(c: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-point (n, 10) coefficients (or one (10,) set) times the monomials of (x, y)."""
    c = np.asarray(c)
    x2, y2 = x * x, y * y
    terms = (np.ones_like(x), x, y, x2, x * y, y2, x2 * x, x2 * y, x * y2, y2 * y)
    return sum(c[..., k] * t for k, t in enumerate(terms))


def _rotation(theta) -> np.ndarray:
    c, s = np.cos(theta), np.sin(theta)
    return np.array([[c, -s], [s, c]])


def _epoch_to_mjd(epoch):
    return _MJD_J2000 + (np.asarray(epoch, dtype=float) - 2000.0) * 365.25


def _flux_njy(mag):
    return 10.0 ** (-0.4 * (np.asarray(mag) - AB_ZERO_POINT_NJY))


def _group(idx: np.ndarray):
    """Yield (value, rows) for each distinct value of an integer array (rows into idx)."""
    order = np.argsort(idx, kind="stable")
    sorted_idx = idx[order]
    bounds = np.flatnonzero(np.diff(sorted_idx)) + 1
    for rows in np.split(order, bounds):
        if rows.size:
            yield int(idx[rows[0]]), rows


# --------------------------------------------------------------------------------------------
# Truth.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrueStars:
    """The true star table: position at `epoch` (2016.0), proper motion, zero parallax."""

    id: np.ndarray  # int64 (s,)
    ra: np.ndarray  # float64 (s,) deg at `epoch`
    dec: np.ndarray
    pmra: np.ndarray  # float64 (s,) mas/yr, pmra * cos(dec)
    pmdec: np.ndarray
    mag: dict[str, np.ndarray]  # band -> (s,) AB mag in the instrument band (what detections see)
    epoch: float = 2016.0
    ref_mag: dict[str, np.ndarray] | None = None  # band -> (s,) AB mag in the reference catalog's band

    @property
    def reference_mag(self) -> dict[str, np.ndarray]:
        """Reference catalog magnitudes (the instrument ones when no colour term was simulated)."""
        return self.mag if self.ref_mag is None else self.ref_mag

    def __len__(self) -> int:
        return self.ra.shape[0]

    def position_at(self, epoch, rows=None) -> tuple[np.ndarray, np.ndarray]:
        """(ra, dec) in deg at `epoch` (scalar or per-row), for all stars or star `rows`."""
        sel = slice(None) if rows is None else rows
        dt = np.asarray(epoch, dtype=float) - self.epoch
        dec0 = self.dec[sel]
        dec = dec0 + self.pmdec[sel] * dt / 3.6e6
        ra = self.ra[sel] + self.pmra[sel] * dt / 3.6e6 / np.cos(np.radians(dec0))
        return ra % 360.0, dec


@dataclass(frozen=True)
class TrueMeasurements:
    """Per-detection truth, row-aligned with `Simulation.data.sources`."""

    source_id: np.ndarray  # int64 (n,)
    visit: np.ndarray  # int64 (n,)
    detector: np.ndarray  # int64 (n,)
    star_id: np.ndarray  # int64 (n,)
    x: np.ndarray  # float64 (n,) true, noise-free pixel position (0-based)
    y: np.ndarray
    ra: np.ndarray  # float64 (n,) deg, true star position at the visit epoch
    dec: np.ndarray
    true_flux: np.ndarray  # float64 (n,) nJy in the visit's band
    is_outlier: np.ndarray  # bool (n,)

    def __len__(self) -> int:
        return self.x.shape[0]


@dataclass(frozen=True)
class TrueCcdVisits:
    """Per detector-visit truth."""

    visit: np.ndarray  # int64 (c,)
    detector: np.ndarray  # int64 (c,)
    calib_center: np.ndarray  # float64 (c,) nJy per count at the detector centre
    zero_point: np.ndarray  # float64 (c,) AB mag of 1 count at the centre: 31.4 - 2.5 log10(calib)
    wcs_error_rms_arcsec: np.ndarray  # float64 (c,) first-guess WCS vs truth over the detector
    wcs_error_max_arcsec: np.ndarray


@dataclass(frozen=True)
class Truth:
    """The known answer of a simulation, and vectorised evaluators of the true maps.

    Astrometry: ``focal = detector_affine[d] @ (1, x, y)`` (mm), then
    ``(xi, eta) = visit_poly[v] @ monomials(focal)`` (deg, `MONOMIALS` order), about
    (pointing_ra[v], pointing_dec[v]). Photometry: ``calib (nJy/count) = calib_scale *
    10**(0.4 zero_point_offset[v]) * detector_gain[d] * (1 + field(v, focal / field_radius_mm))``.
    Visits and detectors are given by id; the arrays here are indexed by position in
    `visit` / `detector`.
    """

    config: SimConfig
    visit: np.ndarray  # int64 (v,) ids, sorted
    pointing_ra: np.ndarray  # float64 (v,) deg, tangent point of visit_poly
    pointing_dec: np.ndarray
    rotation_deg: np.ndarray  # float64 (v,) sky rotation angle
    visit_poly: np.ndarray  # float64 (v, 2, 10) focal (mm) -> tangent plane (deg)
    detector: np.ndarray  # int64 (d,) ids, sorted; id = row * n_det_x + column of the grid
    detector_affine: np.ndarray  # float64 (d, 2, 3) pixel -> focal (mm)
    distortion_k: float  # radial cubic coefficient, 1/mm^2
    calib_scale: float  # nJy per count at nominal calibration
    zero_point_offset: np.ndarray  # float64 (v,) mag; calib scales by 10**(0.4 * this)
    detector_gain: np.ndarray  # float64 (d,) multiplicative, ~1 +- 2 %
    field_coeffs: np.ndarray  # float64 (v, 10) on focal / field_radius_mm, MONOMIALS order
    stars: TrueStars
    measurements: TrueMeasurements
    ccd_visits: TrueCcdVisits
    detector_gradient: np.ndarray | None = None  # float64 (d, 2) (g_x, g_y), see `_detector_gradient`; None: 0

    # Index lookups -------------------------------------------------------------------------
    def visit_index(self, visit) -> np.ndarray:
        visit = np.asarray(visit, dtype=np.int64)
        idx = np.searchsorted(self.visit, visit)
        idx = np.clip(idx, 0, self.visit.size - 1)
        if np.any(self.visit[idx] != visit):
            raise KeyError(f"unknown visit id(s): {np.unique(visit[self.visit[idx] != visit])[:5].tolist()}")
        return idx

    def detector_index(self, detector) -> np.ndarray:
        detector = np.asarray(detector, dtype=np.int64)
        idx = np.clip(np.searchsorted(self.detector, detector), 0, self.detector.size - 1)
        if np.any(self.detector[idx] != detector):
            raise KeyError(f"unknown detector id(s): {np.unique(detector[self.detector[idx] != detector])[:5].tolist()}")
        return idx

    # Maps ----------------------------------------------------------------------------------
    def pixel_to_focal(self, detector, x, y) -> tuple[np.ndarray, np.ndarray]:
        """(n,) detector ids, pixels -> focal plane (mm)."""
        d = self.detector_index(detector)
        x, y = np.broadcast_arrays(np.asarray(x, float), np.asarray(y, float))
        a = self.detector_affine[np.broadcast_to(d, x.shape)]  # (n, 2, 3)
        return a[..., 0, 0] + a[..., 0, 1] * x + a[..., 0, 2] * y, a[..., 1, 0] + a[..., 1, 1] * x + a[..., 1, 2] * y

    def focal_to_pixel(self, detector, fx, fy) -> tuple[np.ndarray, np.ndarray]:
        d = self.detector_index(detector)
        fx, fy = np.broadcast_arrays(np.asarray(fx, float), np.asarray(fy, float))
        a = self.detector_affine[np.broadcast_to(d, fx.shape)]
        det = a[..., 0, 1] * a[..., 1, 2] - a[..., 0, 2] * a[..., 1, 1]
        dx, dy = fx - a[..., 0, 0], fy - a[..., 1, 0]
        return (a[..., 1, 2] * dx - a[..., 0, 2] * dy) / det, (a[..., 0, 1] * dy - a[..., 1, 1] * dx) / det

    def pixel_to_sky(self, visit, detector, x, y) -> tuple[np.ndarray, np.ndarray]:
        """True (ra, dec) in deg of pixel positions; all arguments broadcast to (n,)."""
        visit, detector, x, y = np.broadcast_arrays(*(np.atleast_1d(a) for a in (visit, detector, x, y)))
        fx, fy = self.pixel_to_focal(detector, x, y)
        ra, dec = np.empty(fx.shape), np.empty(fx.shape)
        for vi, rows in _group(self.visit_index(visit).ravel()):
            xi, eta = _poly(self.visit_poly[vi], fx.ravel()[rows], fy.ravel()[rows])
            r, d = inverse_tangent_plane(xi, eta, self.pointing_ra[vi], self.pointing_dec[vi])
            ra.ravel()[rows], dec.ravel()[rows] = r, d
        return ra, dec

    def sky_to_pixel(self, visit, detector, ra, dec) -> tuple[np.ndarray, np.ndarray]:
        """Inverse of `pixel_to_sky` (Newton on the visit polynomial; exact to ~1e-9 px)."""
        visit, detector, ra, dec = np.broadcast_arrays(*(np.atleast_1d(a) for a in (visit, detector, ra, dec)))
        fx, fy = np.empty(ra.shape), np.empty(ra.shape)
        for vi, rows in _group(self.visit_index(visit).ravel()):
            xi, eta = tangent_plane(ra.ravel()[rows], dec.ravel()[rows], self.pointing_ra[vi], self.pointing_dec[vi])
            fx.ravel()[rows], fy.ravel()[rows] = _invert_poly(self.visit_poly[vi], xi, eta)
        return self.focal_to_pixel(detector, fx, fy)

    def calibration(self, visit, detector, x, y) -> np.ndarray:
        """True calibration, nJy per count, at pixel positions (calibrated flux = counts x this)."""
        visit, detector, x, y = np.broadcast_arrays(*(np.atleast_1d(a) for a in (visit, detector, x, y)))
        fx, fy = self.pixel_to_focal(detector, x, y)
        vi, di = self.visit_index(visit), self.detector_index(detector)
        r = self.config.field_radius_mm
        field = _field(self.field_coeffs[vi], fx / r, fy / r)
        slope = _detector_gradient(self.config, self.detector_gradient, di, x, y)
        return (self.calib_scale * 10.0 ** (0.4 * self.zero_point_offset[vi]) * self.detector_gain[di] * (1.0 + field)
                * slope)


@dataclass(frozen=True)
class Simulation:
    """A simulated data set: what the fitter reads (`data`) and the answer (`truth`)."""

    data: InputData
    truth: Truth
    config: SimConfig
    seed: int

    def misassociated(self, assoc) -> np.ndarray:
        """(m,) bool per measurement of `assoc` (a `jcal.associate.Association` of `data`): a detection
        of another true star than most of its fitted star's (blends, chance neighbours)."""
        true_star = self.truth.measurements.star_id[assoc.source_index]
        pairs, counts = np.unique(np.stack([assoc.star, true_star], 1), axis=0, return_counts=True)
        order = np.lexsort((-counts, pairs[:, 0]))
        first = order[np.r_[True, pairs[order[1:], 0] != pairs[order[:-1], 0]]]
        majority = np.empty(assoc.n_stars, np.int64)
        majority[pairs[first, 0]] = pairs[first, 1]
        return true_star != majority[assoc.star]


# --------------------------------------------------------------------------------------------
# The simulation.
# --------------------------------------------------------------------------------------------


def _resolve_config(config: SimConfig | str, overrides: dict) -> SimConfig:
    if isinstance(config, str):
        if config not in PRESETS:
            raise ValueError(f"unknown preset {config!r}; choose one of {list(PRESETS)}")
        config = PRESETS[config]
    return dataclasses.replace(config, **overrides) if overrides else config


def _make_camera(cfg: SimConfig, rng: np.random.Generator):
    """Detector affines (d, 2, 3), nominal centres (d, 2)."""
    px, py = cfg.pitch_mm
    i, j = np.meshgrid(np.arange(cfg.n_det_x), np.arange(cfg.n_det_y))  # detector id = j * n_det_x + i
    centres = np.stack([(i.ravel() - (cfg.n_det_x - 1) / 2) * px, (j.ravel() - (cfg.n_det_y - 1) / 2) * py], axis=1)
    nd = cfg.n_detectors
    shift = rng.normal(0.0, cfg.placement_offset_px * cfg.pixel_size_mm, (nd, 2))
    theta = rng.normal(0.0, cfg.placement_rotation_rad, nd)
    cx, cy = (cfg.det_nx - 1) / 2, (cfg.det_ny - 1) / 2
    affine = np.empty((nd, 2, 3))
    for d in range(nd):
        lin = cfg.pixel_size_mm * _rotation(theta[d])
        affine[d, :, 1:] = lin
        affine[d, :, 0] = centres[d] + shift[d] - lin @ np.array([cx, cy])
    return affine, centres


def _make_visits(cfg: SimConfig, rng: np.random.Generator, k_dist: float):
    """Pointings, rotations, epochs and the (v, 2, 10) focal -> tangent-plane polynomials."""
    nv = cfg.n_visits
    hx, hy = cfg.half_size_mm
    s = cfg.plate_scale
    reach_x, reach_y = ((cfg.dither_fraction * 2 * hx * s, cfg.dither_fraction * 2 * hy * s)
                        if cfg.dither_deg is None else (cfg.dither_deg, cfg.dither_deg))
    dxi = rng.uniform(-1, 1, nv) * reach_x
    deta = rng.uniform(-1, 1, nv) * reach_y
    ra, dec = inverse_tangent_plane(dxi, deta, cfg.ra_deg, cfg.dec_deg)
    rot = rng.uniform(-0.5, 0.5, nv) * cfg.rotation_range_deg
    epochs = np.linspace(cfg.epoch_start, cfg.epoch_end, nv) if nv > 1 else np.array([cfg.epoch_start])
    r_max = cfg.field_radius_mm
    amp = cfg.visit_perturbation_arcsec / 3600.0
    degree = np.array([i + j for i, j in MONOMIALS])
    polys = np.zeros((nv, 2, 10))
    for v in range(nv):
        # Linear: plate scale x sky rotation x parity flip (east to -x, as real cameras).
        m = s * _rotation(np.radians(rot[v])) @ np.diag([-1.0, 1.0])
        c = polys[v]
        c[:, 1], c[:, 2] = m[:, 0], m[:, 1]
        # Radial cubic: m @ u * k |u|^2 -> x^3, x y^2 along m[:,0]; x^2 y, y^3 along m[:,1].
        c[:, 6] += k_dist * m[:, 0]
        c[:, 8] += k_dist * m[:, 0]
        c[:, 7] += k_dist * m[:, 1]
        c[:, 9] += k_dist * m[:, 1]
        # Low-order perturbation: constant + affine + quadratic, ~amp at the field edge.
        low = degree <= 2
        c[:, low] += rng.normal(0.0, amp / np.sqrt(low.sum()), (2, low.sum())) / r_max ** degree[low]
    return ra, dec, rot, epochs, polys


def _make_stars(cfg: SimConfig, rng: np.random.Generator, radius_deg: float) -> TrueStars:
    """Stars uniform on the cap of `radius_deg` about the field centre, power-law counts."""
    cap_area = 2 * np.pi * (1 - np.cos(np.radians(radius_deg))) * np.degrees(1) ** 2
    n = int(rng.poisson(cfg.star_density * cap_area))
    theta = np.arccos(1 - rng.uniform(0, 1, n) * (1 - np.cos(np.radians(radius_deg))))  # uniform on the cap
    az = rng.uniform(0, 2 * np.pi, n)
    ra, dec = inverse_tangent_plane(np.degrees(np.tan(theta) * np.sin(az)), np.degrees(np.tan(theta) * np.cos(az)),
                                    cfg.ra_deg, cfg.dec_deg)
    # N(<m) ∝ 10**(slope m): inverse-CDF sampling.
    a, b = 10 ** (cfg.count_slope * cfg.mag_min), 10 ** (cfg.count_slope * cfg.mag_max)
    mag0 = np.log10(a + rng.uniform(0, 1, n) * (b - a)) / cfg.count_slope
    ref_mags = {}
    for k, band in enumerate(cfg.bands_unique):
        ref_mags[band] = mag0 if k == 0 else mag0 + rng.normal(cfg.colour_mean * k, cfg.colour_sigma, n)
    pmra = rng.normal(cfg.pm_mean_mas[0], cfg.pm_sigma_mas, n)
    pmdec = rng.normal(cfg.pm_mean_mas[1], cfg.pm_sigma_mas, n)
    mags = ref_mags
    if any(cfg.colour_terms):  # the instrument bands differ from the catalog's by c1 x colour
        mags = {}
        for band in cfg.bands_unique:
            secondary, c1 = cfg.colour_term(band)
            mags[band] = ref_mags[band] + c1 * (ref_mags[band] - ref_mags[secondary])
    return TrueStars(id=np.arange(n, dtype=np.int64), ra=ra, dec=dec, pmra=pmra, pmdec=pmdec, mag=mags,
                     epoch=cfg.ref_epoch, ref_mag=ref_mags if mags is not ref_mags else None)


def _make_refcat(cfg: SimConfig, stars: TrueStars, rng: np.random.Generator) -> ReferenceCatalog:
    """The bright stars, observed at the star-table epoch with Gaia-like errors.

    ``ref_id`` is the true star id (a test convenience; fits match by position)."""
    band0 = cfg.bands_unique[0]
    ref_mag = stars.reference_mag
    sel = np.flatnonzero(ref_mag[band0] < cfg.ref_mag_limit)
    m = ref_mag[band0][sel]
    lo, hi = cfg.ref_position_error_mas
    # Errors grow log-linearly with magnitude, lo at mag_min to hi at the limit (Gaia-like).
    frac = np.clip((m - cfg.mag_min) / max(cfg.ref_mag_limit - cfg.mag_min, 1e-9), 0, 1)
    err = lo * (hi / lo) ** frac
    pm_err = cfg.ref_pm_error_ratio * err
    n = sel.size
    dec = stars.dec[sel] + rng.normal(0, 1, n) * err / 3.6e6
    ra = (stars.ra[sel] + rng.normal(0, 1, n) * err / 3.6e6 / np.cos(np.radians(stars.dec[sel]))) % 360.0
    fluxes = {}
    for band in cfg.bands_unique:
        f = _flux_njy(ref_mag[band][sel])
        fluxes[band] = (f * (1 + cfg.ref_flux_error * rng.normal(0, 1, n)), cfg.ref_flux_error * f)
    return ReferenceCatalog(
        ref_id=stars.id[sel], ra=ra, dec=dec, ra_err=err, dec_err=err.copy(), epoch=np.full(n, stars.epoch),
        pmra=stars.pmra[sel] + rng.normal(0, 1, n) * pm_err, pmdec=stars.pmdec[sel] + rng.normal(0, 1, n) * pm_err,
        pmra_err=pm_err, pmdec_err=pm_err.copy(), fluxes=fluxes,
    )


def _detect_visit(cfg, truth_parts, vi, stars, rng, fwhm_px, bg_sigma, field_radius_deg):
    """All detections of visit index `vi`: dict of (n,) arrays, sorted by detector."""
    (visit_ids, pra, pdec, epochs, polys, affine, calib) = truth_parts
    ra_t, dec_t = stars.position_at(epochs[vi])
    xi, eta = tangent_plane(ra_t, dec_t, pra[vi], pdec[vi])
    near = np.flatnonzero(xi * xi + eta * eta < field_radius_deg ** 2)
    fx, fy = _invert_poly(polys[vi], xi[near], eta[near])
    # Which detector: nearest grid cell (placement offsets << gaps, so this is unique).
    px, py = cfg.pitch_mm
    i = np.rint(fx / px + (cfg.n_det_x - 1) / 2).astype(np.int64)
    j = np.rint(fy / py + (cfg.n_det_y - 1) / 2).astype(np.int64)
    ok = (i >= 0) & (i < cfg.n_det_x) & (j >= 0) & (j < cfg.n_det_y)
    near, fx, fy, det = near[ok], fx[ok], fy[ok], (j * cfg.n_det_x + i)[ok]
    a = affine[det]  # (n, 2, 3)
    adet = a[:, 0, 1] * a[:, 1, 2] - a[:, 0, 2] * a[:, 1, 1]
    dx, dy = fx - a[:, 0, 0], fy - a[:, 1, 0]
    x = (a[:, 1, 2] * dx - a[:, 0, 2] * dy) / adet
    y = (a[:, 0, 1] * dy - a[:, 1, 1] * dx) / adet
    inside = (x >= -0.5) & (x <= cfg.det_nx - 0.5) & (y >= -0.5) & (y <= cfg.det_ny - 0.5)
    star, det, x, y = near[inside], det[inside], x[inside], y[inside]
    n = star.size

    band = cfg.bands[vi % len(cfg.bands)]
    flux = _flux_njy(stars.mag[band][star])
    counts = flux / calib(vi, det, x, y)
    flux_err = np.sqrt(counts + bg_sigma ** 2)  # Poisson (gain 1) + background
    inst_flux = counts + flux_err * rng.normal(0, 1, n)
    sigma = np.maximum(cfg.centroid_factor * fwhm_px / (2.355 * counts / flux_err), cfg.centroid_floor_px)
    mx = x + sigma * rng.normal(0, 1, n)
    my = y + sigma * rng.normal(0, 1, n)
    outlier = rng.uniform(0, 1, n) < cfg.outlier_fraction
    k = int(outlier.sum())
    if k:
        off = rng.uniform(*cfg.outlier_offset_arcsec, k) / cfg.pixel_scale_arcsec
        ang = rng.uniform(0, 2 * np.pi, k)
        mx[outlier] += off * np.cos(ang)
        my[outlier] += off * np.sin(ang)
    keep = ((inst_flux / flux_err >= cfg.min_snr) & (mx >= -0.5) & (mx <= cfg.det_nx - 0.5)
            & (my >= -0.5) & (my <= cfg.det_ny - 0.5))
    order = np.flatnonzero(keep)[np.argsort(det[keep], kind="stable")]
    return {
        "visit": np.full(order.size, visit_ids[vi], dtype=np.int64), "detector": det[order],
        "x": mx[order], "y": my[order], "x_err": sigma[order], "y_err": sigma[order].copy(),
        "inst_flux": inst_flux[order], "inst_flux_err": flux_err[order],
        "star_id": stars.id[star[order]], "true_x": x[order], "true_y": y[order],
        "ra": ra_t[star[order]], "dec": dec_t[star[order]], "true_flux": flux[order], "is_outlier": outlier[order],
    }


def _first_guess_wcs(cfg, vi, pra, pdec, polys, affine, rng):
    """TAN-SIP first guesses for all detectors of visit index `vi`.

    Returns per detector: crval (d, 2), cd (d, 2, 2), sip a/b (d, 4, 4), and the rms / max
    error vs truth (d,) arcsec over the fit grid.
    """
    nd, g = cfg.n_detectors, cfg.wcs_grid
    cx, cy = (cfg.det_nx - 1) / 2, (cfg.det_ny - 1) / 2
    gx, gy = np.meshgrid(np.linspace(-0.5, cfg.det_nx - 0.5, g), np.linspace(-0.5, cfg.det_ny - 0.5, g))
    px = np.concatenate([[cx], gx.ravel()])  # point 0: the detector centre (CRPIX)
    py = np.concatenate([[cy], gy.ravel()])
    fx = affine[:, 0, 0, None] + affine[:, 0, 1, None] * px + affine[:, 0, 2, None] * py  # (d, 1 + g^2)
    fy = affine[:, 1, 0, None] + affine[:, 1, 1, None] * px + affine[:, 1, 2, None] * py
    xi, eta = _poly(polys[vi], fx, fy)
    true_ra, true_dec = inverse_tangent_plane(xi, eta, pra[vi], pdec[vi])
    # Perturb: rotate/scale about the detector centre, then shift (in the visit tangent plane).
    lo, hi = cfg.wcs_shift_arcsec
    shift = rng.uniform(lo, hi, nd) / 3600.0
    ang = rng.uniform(0, 2 * np.pi, nd)
    rot = rng.normal(0, cfg.wcs_rotation_sigma_rad, nd)[:, None]
    scale = 1 + rng.normal(0, cfg.wcs_scale_sigma, nd)[:, None]
    dxi, deta = xi - xi[:, :1], eta - eta[:, :1]
    pxi = xi[:, :1] + scale * (np.cos(rot) * dxi - np.sin(rot) * deta) + (shift * np.cos(ang))[:, None]
    peta = eta[:, :1] + scale * (np.sin(rot) * dxi + np.cos(rot) * deta) + (shift * np.sin(ang))[:, None]
    if cfg.wcs_visit_shift_arcsec[1] > 0 or cfg.wcs_visit_rotation_sigma_rad > 0 or cfg.wcs_visit_scale_sigma > 0:
        pxi, peta = _visit_error(cfg, rng, pxi, peta)  # drawn only when asked: other presets unchanged
    pra_, pdec_ = inverse_tangent_plane(pxi, peta, pra[vi], pdec[vi])
    crval = np.stack([pra_[:, 0], pdec_[:, 0]], axis=1)
    # Fit the perturbed map, re-projected about CRVAL, by a cubic in (u, v) = pixel - centre
    # without constant term (zero at CRPIX by construction): the TAN-SIP form.
    txi, teta = tangent_plane(pra_, pdec_, crval[:, :1], crval[:, 1:])
    L = max(cfg.det_nx, cfg.det_ny) / 2  # normalise for a well-conditioned fit
    mono = _monomials((px - cx) / L, (py - cy) / L)[1:].T  # (1 + g^2, 9)
    rhs = np.concatenate([txi, teta], axis=0).T  # (1 + g^2, 2d)
    coef = np.linalg.pinv(mono) @ rhs  # least squares, (9, 2d)
    fit = mono @ coef
    fxi, feta = fit[:, :nd].T, fit[:, nd:].T
    degree = np.array([i + j for i, j in MONOMIALS[1:]])
    coef = coef / L ** degree[:, None]
    cxi, ceta = coef[:, :nd].T, coef[:, nd:].T  # (d, 9), MONOMIALS[1:] order
    cd = np.stack([np.stack([cxi[:, 0], cxi[:, 1]], -1), np.stack([ceta[:, 0], ceta[:, 1]], -1)], axis=1)
    # SIP: (xi, eta) = CD (u + f, v + g)  =>  (f, g) = CD^-1 (higher-order terms).
    high = np.stack([cxi[:, 2:], ceta[:, 2:]], axis=1)  # (d, 2, 7)
    fg = np.linalg.solve(cd, high)  # (d, 2, 7)
    sip = np.zeros((nd, 2, 4, 4))
    for t, (i, j) in enumerate(MONOMIALS[3:]):
        sip[:, :, i, j] = fg[:, :, t]
    # Error of the first guess vs truth, evaluating the fitted TAN-SIP.
    fra, fdec = inverse_tangent_plane(fxi, feta, crval[:, :1], crval[:, 1:])
    dra = ((fra - true_ra + 180) % 360 - 180) * np.cos(np.radians(true_dec))
    sep = np.hypot(dra, fdec - true_dec)[:, 1:] * 3600.0
    return crval, cd, sip, np.sqrt(np.mean(sep ** 2, axis=1)), sep.max(axis=1)


def _visit_error(cfg: SimConfig, rng: np.random.Generator, xi, eta):
    """One shift, rotation and scale error for a whole visit, about its pointing (tangent plane, deg)."""
    lo, hi = cfg.wcs_visit_shift_arcsec
    shift, ang = rng.uniform(lo, hi) / 3600.0, rng.uniform(0, 2 * np.pi)
    rot = rng.normal(0, cfg.wcs_visit_rotation_sigma_rad)
    scale = 1 + rng.normal(0, cfg.wcs_visit_scale_sigma)
    c, s = scale * np.cos(rot), scale * np.sin(rot)
    return c * xi - s * eta + shift * np.cos(ang), s * xi + c * eta + shift * np.sin(ang)


def _detector_gradient(cfg: SimConfig, gradient, det, x, y):
    """1 + g_x u + g_y v, (u, v) = pixel normalised to [-1, 1] across the detector."""
    if gradient is None:
        return 1.0
    u = (x - (cfg.det_nx - 1) / 2) / (cfg.det_nx / 2)
    v = (y - (cfg.det_ny - 1) / 2) / (cfg.det_ny / 2)
    return 1.0 + gradient[det, 0] * u + gradient[det, 1] * v


def _tan_sip(cfg: SimConfig, crval, cd, sip) -> WCS:
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"]
    wcs.wcs.crpix = [(cfg.det_nx - 1) / 2 + 1, (cfg.det_ny - 1) / 2 + 1]  # FITS is 1-based
    wcs.wcs.crval = crval
    wcs.wcs.cd = cd
    wcs.sip = Sip(sip[0], sip[1], None, None, wcs.wcs.crpix)
    wcs.pixel_shape = (cfg.det_nx, cfg.det_ny)
    wcs.wcs.set()
    return wcs


def simulate(config: SimConfig | str = "small", seed: int = 0, **overrides) -> Simulation:
    """Simulate a data set. `config`: a `SimConfig` or a preset name from `PRESETS`
    ("tiny", "small", "medium", "large", "huge", "edge", "edge_small"); keyword `overrides` replace config fields,
    e.g. ``simulate("tiny", n_visits=6)``. Same config and seed give identical output."""
    cfg = _resolve_config(config, overrides)
    streams = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(7)]
    rng_cam, rng_vis, rng_star, rng_ref, rng_det, rng_wcs, rng_cal = streams

    affine, centres = _make_camera(cfg, rng_cam)
    r_max = cfg.field_radius_mm
    k_dist = cfg.distortion_edge_arcsec / 3600.0 / (cfg.plate_scale * r_max ** 3)
    pra, pdec, rot, epochs, polys = _make_visits(cfg, rng_vis, k_dist)
    visit_ids = cfg.first_visit_id + np.arange(cfg.n_visits, dtype=np.int64)
    detector_ids = np.arange(cfg.n_detectors, dtype=np.int64)

    # Photometric calibration truth.
    zp_offset = rng_cal.normal(0, cfg.zero_point_sigma_mag, cfg.n_visits)
    gain = 1 + rng_cal.normal(0, cfg.detector_gain_sigma, cfg.n_detectors)
    field = np.zeros((cfg.n_visits, 10))
    # 5 linear + quadratic terms on |coords| <= 1, each within amplitude / 5: |field| <= amplitude.
    field[:, 1:6] = rng_cal.uniform(-1, 1, (cfg.n_visits, 5)) * cfg.field_amplitude / 5
    calib_scale = 10 ** (0.4 * (AB_ZERO_POINT_NJY - cfg.instrumental_zero_point))
    gradient = (rng_cal.normal(0, cfg.detector_gradient_sigma, (cfg.n_detectors, 2))
                if cfg.detector_gradient_sigma > 0 else None)

    def calib(vi, det, x, y):
        a = affine[det]
        fx = a[..., 0, 0] + a[..., 0, 1] * x + a[..., 0, 2] * y
        fy = a[..., 1, 0] + a[..., 1, 1] * x + a[..., 1, 2] * y
        f = _field(field[vi], fx / r_max, fy / r_max)
        return calib_scale * 10 ** (0.4 * zp_offset[vi]) * gain[det] * (1 + f) * _detector_gradient(cfg, gradient, det, x, y)

    # Sky: the cap must hold every star any visit can see (field + dither + rotation + margin).
    field_radius_deg = cfg.plate_scale * r_max * (1 + abs(k_dist) * r_max ** 2) * 1.02 + 10 / 3600
    dither = np.max(np.hypot(*tangent_plane(pra, pdec, cfg.ra_deg, cfg.dec_deg)))
    stars = _make_stars(cfg, rng_star, field_radius_deg + dither + 30 / 3600)
    refcat = _make_refcat(cfg, stars, rng_ref)

    fwhm_px = cfg.seeing_fwhm_arcsec / cfg.pixel_scale_arcsec
    bg_sigma = 10 ** (-0.4 * (cfg.depth_mag - cfg.instrumental_zero_point)) / 5.0  # counts
    parts = (visit_ids, pra, pdec, epochs, polys, affine, calib)
    det_rngs = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(8 + cfg.n_visits)[8:]]
    chunks = [_detect_visit(cfg, parts, vi, stars, det_rngs[vi], fwhm_px, bg_sigma, field_radius_deg)
              for vi in range(cfg.n_visits)]
    # Concatenate column by column, freeing the per-visit pieces as we go (memory-lean).
    det = {k: np.concatenate([c.pop(k) for c in chunks]) for k in list(chunks[0])}
    del chunks
    n = det["x"].size
    source_id = np.arange(n, dtype=np.int64)
    sources = SourceCatalog(visit=det["visit"], detector=det["detector"], x=det["x"], y=det["y"],
                            x_err=det["x_err"], y_err=det["y_err"], inst_flux=det["inst_flux"],
                            inst_flux_err=det["inst_flux_err"], source_id=source_id)
    measurements = TrueMeasurements(source_id=source_id, visit=det["visit"], detector=det["detector"],
                                    star_id=det["star_id"], x=det["true_x"], y=det["true_y"], ra=det["ra"],
                                    dec=det["dec"], true_flux=det["true_flux"], is_outlier=det["is_outlier"])
    del det

    # First-guess WCS for every detector-visit.
    ccd_visits: dict[tuple[int, int], CcdVisit] = {}
    rms, worst = [], []
    for vi in range(cfg.n_visits):
        crval, cd, sip, r, w = _first_guess_wcs(cfg, vi, pra, pdec, polys, affine, rng_wcs)
        rms.append(r)
        worst.append(w)
        for d in range(cfg.n_detectors):
            key = (int(visit_ids[vi]), int(detector_ids[d]))
            ccd_visits[key] = CcdVisit(visit=key[0], detector=key[1], wcs=_tan_sip(cfg, crval[d], cd[d], sip[d]),
                                       nx=cfg.det_nx, ny=cfg.det_ny)
    cv_visit = np.repeat(visit_ids, cfg.n_detectors)
    cv_det = np.tile(detector_ids, cfg.n_visits)
    centre = calib(np.repeat(np.arange(cfg.n_visits), cfg.n_detectors), cv_det,
                   np.full(cv_det.size, (cfg.det_nx - 1) / 2), np.full(cv_det.size, (cfg.det_ny - 1) / 2))
    true_ccd = TrueCcdVisits(visit=cv_visit, detector=cv_det, calib_center=centre,
                             zero_point=AB_ZERO_POINT_NJY - 2.5 * np.log10(centre),
                             wcs_error_rms_arcsec=np.concatenate(rms), wcs_error_max_arcsec=np.concatenate(worst))

    visits = VisitTable(visit=visit_ids, mjd=_epoch_to_mjd(epochs),
                        band=np.array([cfg.bands[k % len(cfg.bands)] for k in range(cfg.n_visits)]),
                        exptime=np.full(cfg.n_visits, cfg.exptime),
                        airmass=1.0 + rng_vis.uniform(0, 0.5, cfg.n_visits))
    camera = Camera(detector=detector_ids, focal_x=centres[:, 0], focal_y=centres[:, 1],
                    nx=np.full(cfg.n_detectors, cfg.det_nx), ny=np.full(cfg.n_detectors, cfg.det_ny),
                    pixel_scale=np.full(cfg.n_detectors, cfg.pixel_scale_arcsec))
    data = InputData(sources=sources, ccd_visits=ccd_visits, refcat=refcat, visits=visits, camera=camera)
    truth = Truth(config=cfg, visit=visit_ids, pointing_ra=pra, pointing_dec=pdec, rotation_deg=rot,
                  visit_poly=polys, detector=detector_ids, detector_affine=affine, distortion_k=float(k_dist),
                  calib_scale=float(calib_scale), zero_point_offset=zp_offset, detector_gain=gain,
                  field_coeffs=field, stars=stars, measurements=measurements, ccd_visits=true_ccd,
                  detector_gradient=gradient)
    return Simulation(data=data, truth=truth, config=cfg, seed=seed)


# --------------------------------------------------------------------------------------------
# Writing and reading back the truth.
# --------------------------------------------------------------------------------------------


def _write_parquet(path: Path, columns: dict[str, np.ndarray]) -> None:
    pq.write_table(pa.table({k: pa.array(np.asarray(v)) for k, v in columns.items()}), path)


def write_simulation(sim: Simulation, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write `sim` as a jcal input directory plus ``truth/`` (which the fitter never reads).

    ``truth/`` holds: ``stars.parquet`` (id, ra, dec at epoch, pmra, pmdec, mag_<band>),
    ``measurements.parquet`` (per detection: source_id, visit, detector, star_id, true x/y,
    true ra/dec at the visit epoch, true_flux, is_outlier), ``calibration.parquet`` (per
    detector-visit: calib_center nJy/count, zero_point, first-guess WCS error),
    ``visits.parquet`` / ``detectors.parquet`` (the true model parameters) and
    ``config.json``. `read_truth` reads it back. Written atomically.
    """
    path = Path(path)
    t = sim.truth
    with atomic_output_dir(path, overwrite=overwrite) as tmp:
        write_input_files(sim.data, tmp)
        tdir = tmp / "truth"
        tdir.mkdir()
        s = t.stars
        _write_parquet(tdir / "stars.parquet", {"id": s.id, "ra": s.ra, "dec": s.dec, "pmra": s.pmra,
                                                "pmdec": s.pmdec, "epoch": np.full(len(s), s.epoch),
                                                **{f"mag_{b}": m for b, m in s.mag.items()},
                                                **{f"ref_mag_{b}": m for b, m in (s.ref_mag or {}).items()}})
        _write_parquet(tdir / "measurements.parquet",
                       {f.name: getattr(t.measurements, f.name) for f in dataclasses.fields(t.measurements)})
        _write_parquet(tdir / "calibration.parquet",
                       {f.name: getattr(t.ccd_visits, f.name) for f in dataclasses.fields(t.ccd_visits)})
        _write_parquet(tdir / "visits.parquet", {
            "visit": t.visit, "pointing_ra": t.pointing_ra, "pointing_dec": t.pointing_dec,
            "rotation_deg": t.rotation_deg, "zero_point_offset": t.zero_point_offset,
            **{f"poly_{ax}_{i}{j}": t.visit_poly[:, a, k] for a, ax in enumerate("xe")
               for k, (i, j) in enumerate(MONOMIALS)},
            **{f"field_{i}{j}": t.field_coeffs[:, k] for k, (i, j) in enumerate(MONOMIALS)},
        })
        _write_parquet(tdir / "detectors.parquet", {
            "detector": t.detector, "gain": t.detector_gain,
            **({} if t.detector_gradient is None else {"gradient_x": t.detector_gradient[:, 0],
                                                        "gradient_y": t.detector_gradient[:, 1]}),
            **{f"affine_{a}{k}": t.detector_affine[:, a, k] for a in range(2) for k in range(3)},
        })
        (tdir / "config.json").write_text(json.dumps({
            "seed": sim.seed, "config": sim.config.to_dict(), "distortion_k": t.distortion_k,
            "calib_scale": t.calib_scale, "monomials": [list(m) for m in MONOMIALS],
            "colour_terms": {b: {"primary": b, "secondary": sim.config.colour_term(b)[0],
                                 "c1": sim.config.colour_term(b)[1]} for b in sim.config.bands_unique},
            "notes": "poly_x_ij / poly_e_ij: xi / eta (deg) coefficient of fx^i fy^j (mm); "
                     "affine_ak: focal axis a = affine_a0 + affine_a1 x + affine_a2 y; parallax is 0.",
        }, indent=1))
    return path


def read_truth(path: str | os.PathLike) -> Truth:
    """Read the ``truth/`` of a directory written by `write_simulation` back into a `Truth`."""
    tdir = Path(path) / "truth"
    meta = json.loads((tdir / "config.json").read_text())
    cfg = SimConfig.from_dict(meta["config"])

    def cols(name):
        table = pq.read_table(tdir / name)
        return {c: table.column(c).to_numpy() for c in table.column_names}

    st = cols("stars.parquet")
    stars = TrueStars(id=st["id"], ra=st["ra"], dec=st["dec"], pmra=st["pmra"], pmdec=st["pmdec"],
                      mag={k[4:]: v for k, v in st.items() if k.startswith("mag_")},
                      epoch=float(st["epoch"][0]) if st["epoch"].size else cfg.ref_epoch,
                      ref_mag={k[8:]: v for k, v in st.items() if k.startswith("ref_mag_")} or None)
    vs, ds = cols("visits.parquet"), cols("detectors.parquet")
    polys = np.stack([np.stack([vs[f"poly_{ax}_{i}{j}"] for i, j in MONOMIALS], -1) for ax in "xe"], axis=1)
    field = np.stack([vs[f"field_{i}{j}"] for i, j in MONOMIALS], -1)
    affine = np.stack([np.stack([ds[f"affine_{a}{k}"] for k in range(3)], -1) for a in range(2)], axis=1)
    return Truth(config=cfg, visit=vs["visit"], pointing_ra=vs["pointing_ra"], pointing_dec=vs["pointing_dec"],
                 rotation_deg=vs["rotation_deg"], visit_poly=polys, detector=ds["detector"], detector_affine=affine,
                 distortion_k=meta["distortion_k"], calib_scale=meta["calib_scale"],
                 zero_point_offset=vs["zero_point_offset"], detector_gain=ds["gain"], field_coeffs=field,
                 stars=stars, measurements=TrueMeasurements(**cols("measurements.parquet")),
                 ccd_visits=TrueCcdVisits(**cols("calibration.parquet")),
                 detector_gradient=np.stack([ds["gradient_x"], ds["gradient_y"]], 1) if "gradient_x" in ds else None)


if __name__ == "__main__":  # quick size/timing table: python -m jcal.simulate [preset ...]
    import sys

    for name in sys.argv[1:] or ["tiny", "small"]:
        t0 = time.perf_counter()
        sim = simulate(name)
        dt = time.perf_counter() - t0
        print(f"{name}: {len(sim.data.sources)} detections, {len(sim.truth.stars)} stars, "
              f"{len(sim.data.refcat)} ref stars, {len(sim.data.ccd_visits)} ccd-visits, {dt:.2f} s")
