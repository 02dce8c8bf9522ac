"""TAN-SIP approximation of a fitted pixel -> sky mapping, for FITS headers.

jcal's astrometric models (per-detector and per-visit polynomials, proper motions, ...) are
richer than anything a FITS header can express. Tools that only read FITS WCSs (ds9,
astropy, the LSST butler's SIP-based exports) still need one, so for each detector-visit we
approximate the fitted mapping with a TAN-SIP WCS and record, in the header, how good the
approximation is (`JCAL_RMS`, `JCAL_MAX`, in mas, measured by evaluating the header itself
with astropy against the exact mapping on a grid denser than the fit grid).

The fit: CRPIX at the detector centre, CRVAL the sky position there (or a given one), sky
positions projected gnomonically about CRVAL, then one linear least-squares fit of the
intermediate world coordinates as a polynomial of the pixel offsets (u, v). The linear
part gives CD; the rest, mapped through CD^-1, gives the forward SIP coefficients A/B.
Pixel offsets are scaled to [-1, 1] in the design matrix (raw offsets of ~2000 px to the
9th power would make it hopelessly ill-conditioned) and the coefficients converted back
to SIP's raw-pixel convention afterwards. The inverse SIP (AP/BP, one order higher) is fitted
to the forward model so that sky -> pixel is fast and consistent with pixel -> sky.
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS, FITSFixedWarning

from ..sky import angle, unit_vectors

__all__ = ["fit_tan_sip", "write_wcs_fits", "measure_wcs_error"]

log = logging.getLogger("jcal.io.sip")

_MAS_PER_RAD = 180.0 / np.pi * 3600.0e3

PixelToSky = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


# --------------------------------------------------------------------------- geometry


def _separation_mas(ra1, dec1, ra2, dec2) -> np.ndarray:
    """Angular separation in mas; atan2 form, accurate down to ~1e-8 mas."""
    return angle(unit_vectors(ra1, dec1), unit_vectors(ra2, dec2)) * _MAS_PER_RAD


def _gnomonic(ra_deg: np.ndarray, dec_deg: np.ndarray, crval: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """FITS TAN intermediate world coordinates (deg) about crval: (xi east, eta north)."""
    p = unit_vectors(ra_deg, dec_deg)  # (n, 3)
    a0, d0 = np.radians(crval[0]), np.radians(crval[1])
    centre = np.array([np.cos(d0) * np.cos(a0), np.cos(d0) * np.sin(a0), np.sin(d0)])
    east = np.array([-np.sin(a0), np.cos(a0), 0.0])
    north = np.array([-np.sin(d0) * np.cos(a0), -np.sin(d0) * np.sin(a0), np.cos(d0)])
    w = p @ centre
    if np.any(w <= 0):
        raise ValueError("fit_tan_sip: part of the detector is 90 deg or more from CRVAL")
    return np.degrees(p @ east / w), np.degrees(p @ north / w)


# --------------------------------------------------------------------------- polynomials


def _terms(lo: int, hi: int) -> list[tuple[int, int]]:
    """Exponents (p, q) of u^p v^q with lo <= p + q <= hi."""
    return [(p, d - p) for d in range(lo, hi + 1) for p in range(d, -1, -1)]


def _monomials(u: np.ndarray, v: np.ndarray, terms: list[tuple[int, int]]) -> np.ndarray:
    """(n,), (n,) -> (n, k) matrix of u^p v^q, from tables of powers (no float pow)."""
    n = max(max(p, q) for p, q in terms)
    up, vp = np.ones((n + 1, u.size)), np.ones((n + 1, v.size))
    for k in range(1, n + 1):
        up[k], vp[k] = up[k - 1] * u, vp[k - 1] * v
    return np.stack([up[p] * vp[q] for p, q in terms], axis=1)


def _fit_poly(u: np.ndarray, v: np.ndarray, targets: np.ndarray, terms: list[tuple[int, int]],
              su: float, sv: float) -> np.ndarray:
    """Least-squares polynomial in raw offsets (u, v), solved in scaled (u/su, v/sv).

    u, v: (n,); targets: (n, t). Returns (len(terms), t) coefficients of raw u^p v^q.
    """
    design = _monomials(u / su, v / sv, terms)  # (n, k), entries in [-1, 1]
    # SVD least squares on the scaled design: no squared condition number as with normal
    # equations, and near-degenerate high-order terms cannot blow up.
    coef, *_ = np.linalg.lstsq(design, targets, rcond=None)
    scale = np.array([su**p * sv**q for p, q in terms])[:, None]
    return coef / scale


def _eval_poly(u: np.ndarray, v: np.ndarray, coef: np.ndarray, terms: list[tuple[int, int]]) -> np.ndarray:
    """(n,) offsets, (k, t) raw coefficients -> (n, t)."""
    return _monomials(u, v, terms) @ coef


# --------------------------------------------------------------------------- header


def _header(nx: int, ny: int, crpix: tuple[float, float], crval: tuple[float, float], cd: np.ndarray,
            order: int, fwd_terms, fwd: np.ndarray, inv_terms, inv: np.ndarray) -> fits.Header:
    """Assemble the WCS cards. fwd/inv: (k, 2) SIP coefficients (A|B, AP|BP) for the terms."""
    sip = order >= 2
    h = fits.Header()
    h["NAXIS1"] = (int(nx), "detector width, pixels")
    h["NAXIS2"] = (int(ny), "detector height, pixels")
    h["WCSAXES"] = 2
    h["CTYPE1"] = "RA---TAN-SIP" if sip else "RA---TAN"
    h["CTYPE2"] = "DEC--TAN-SIP" if sip else "DEC--TAN"
    h["CUNIT1"] = "deg"
    h["CUNIT2"] = "deg"
    h["RADESYS"] = "ICRS"
    h["CRPIX1"] = (float(crpix[0]), "detector centre, 1-based")
    h["CRPIX2"] = (float(crpix[1]), "detector centre, 1-based")
    h["CRVAL1"] = float(crval[0])
    h["CRVAL2"] = float(crval[1])
    for i in range(2):
        for j in range(2):
            h[f"CD{i + 1}_{j + 1}"] = float(cd[i, j])
    if sip:
        for name, terms, coef, n in (("A", fwd_terms, fwd[:, 0], order), ("B", fwd_terms, fwd[:, 1], order),
                                     ("AP", inv_terms, inv[:, 0], order + 1),
                                     ("BP", inv_terms, inv[:, 1], order + 1)):
            h[f"{name}_ORDER"] = (n, "SIP polynomial order")
            for (p, q), c in zip(terms, coef):
                h[f"{name}_{p}_{q}"] = float(c)
    return h


def _wcs(header: fits.Header) -> WCS:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        return WCS(header)


def _eval_sip_matrix(coef: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """Evaluate an astropy SIP coefficient matrix coef[p, q] at (n, 2) offsets -> (n,)."""
    p, q = np.nonzero(coef)
    if p.size == 0:
        return np.zeros(uv.shape[0])
    return _monomials(uv[:, 0], uv[:, 1], list(zip(p.tolist(), q.tolist()))) @ coef[p, q]


def measure_wcs_error(header: fits.Header, x: np.ndarray, y: np.ndarray, ra: np.ndarray,
                      dec: np.ndarray) -> tuple[float, float, float]:
    """Errors of a FITS WCS header against known positions, as astropy evaluates it.

    x, y: (n,) 0-based pixels; ra, dec: (n,) true sky positions, deg. Returns (rms mas,
    max mas, max pixel error of the sky -> pixel inverse SIP (0 without SIP)). The header
    goes through its text form first, so the numbers hold for the header as written.
    """
    w = _wcs(fits.Header.fromstring(header.tostring()))
    ra_w, dec_w = w.all_pix2world(x, y, 0)
    sep = _separation_mas(ra_w, dec_w, ra, dec)
    inv_max = 0.0
    if w.sip is not None and w.sip.ap is not None:
        # Inverse through the linear WCS + AP/BP only (what fast sky -> pixel code does),
        # evaluated from the SIP definition: astropy's sip_foc2pix has origin quirks.
        crpix0 = w.wcs.crpix - 1.0
        foc = w.wcs_world2pix(np.stack([ra_w, dec_w], axis=1), 0) - crpix0  # (n, 2) (U, V)
        pix = foc + np.stack([_eval_sip_matrix(w.sip.ap, foc), _eval_sip_matrix(w.sip.bp, foc)], axis=1) + crpix0
        inv_max = float(np.max(np.hypot(pix[:, 0] - x, pix[:, 1] - y)))
    return float(np.sqrt(np.mean(sep**2))), float(np.max(sep)), inv_max


# --------------------------------------------------------------------------- fit


def _fit_order(u, v, xi, eta, order: int, const: bool, su: float, sv: float):
    """Fit CD, forward SIP (order) and inverse SIP (order + 1) to tangent-plane positions.

    u, v, xi, eta: (n,) pixel offsets from CRPIX and intermediate world coords (deg).
    Returns (cd (2, 2), forward terms, (k, 2) A|B, inverse terms, (k', 2) AP|BP).
    """
    terms = ([(0, 0)] if const else []) + _terms(1, order)
    coef = _fit_poly(u, v, np.stack([xi, eta], axis=1), terms, su, sv)  # (k, 2)
    cd = np.stack([coef[terms.index((1, 0))], coef[terms.index((0, 1))]], axis=1)  # (2, 2)
    fwd_terms = [t for t in terms if t not in ((1, 0), (0, 1))]
    # xi = CD (u + f, v + g): the non-linear terms of (xi, eta), mapped through CD^-1.
    fwd = np.stack([coef[terms.index(t)] for t in fwd_terms]) @ np.linalg.inv(cd).T if fwd_terms \
        else np.zeros((0, 2))
    # Inverse: u = U + AP(U, V) with (U, V) = (u + f, v + g), on the same grid.
    uv = np.stack([u, v], axis=1)
    foc = uv + (_eval_poly(u, v, fwd, fwd_terms) if fwd_terms else 0.0)  # (n, 2)
    inv_terms = _terms(0, order + 1)
    inv = _fit_poly(foc[:, 0], foc[:, 1], uv - foc, inv_terms, su, sv)
    return cd, fwd_terms, fwd, inv_terms, inv


def fit_tan_sip(pixel_to_sky: PixelToSky, nx: int, ny: int, crval: tuple[float, float] | None = None,
                order: int | None = None, grid: int = 50, max_order: int = 9,
                target_mas: float = 0.1) -> tuple[fits.Header, float]:
    """Approximate `pixel_to_sky` over an nx x ny detector with a FITS TAN-SIP WCS.

    pixel_to_sky: vectorised (x, y) 0-based pixels -> (ra, dec) deg. order: SIP order of the
    forward polynomial (1 = plain TAN, no SIP); None picks the lowest order from 2 to
    max_order whose RMS error is below target_mas. grid: fit points per axis (the error is
    measured on a (2 grid - 1)^2 grid that also samples between fit points).

    Returns (header, rms_mas). The header carries NAXIS1/2, the WCS (CD + A/B + AP/BP), and
    JCAL_RMS / JCAL_MAX / JCAL_IMX: the RMS and max sky error in mas and the max pixel error
    of the inverse SIP, as measured by astropy on the written header.
    """
    if nx < 1 or ny < 1:
        raise ValueError(f"fit_tan_sip: detector size must be positive, got {nx} x {ny}")
    if order is not None and order < 1:
        raise ValueError(f"fit_tan_sip: order must be >= 1, got {order}")
    highest = order if order is not None else max(max_order, 2)
    if grid < highest + 3:  # the inverse (order + 1) needs more grid lines than its order
        raise ValueError(f"fit_tan_sip: grid = {grid} is too coarse for SIP order {highest}; "
                         f"use grid >= {highest + 3}")
    x0, y0 = (nx - 1) / 2.0, (ny - 1) / 2.0  # 0-based centre; CRPIX = centre + 1
    su, sv = max(nx / 2.0, 1.0), max(ny / 2.0, 1.0)  # |u| <= su over [-0.5, nx - 0.5]

    def mesh(n: int) -> tuple[np.ndarray, np.ndarray]:
        gx, gy = np.meshgrid(np.linspace(-0.5, nx - 0.5, n), np.linspace(-0.5, ny - 0.5, n))
        return gx.ravel(), gy.ravel()

    def sky(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ra, dec = pixel_to_sky(x, y)
        ra = np.asarray(ra, dtype=np.float64).reshape(x.shape)
        dec = np.asarray(dec, dtype=np.float64).reshape(x.shape)
        if not (np.all(np.isfinite(ra)) and np.all(np.isfinite(dec))):
            raise ValueError("fit_tan_sip: pixel_to_sky returned non-finite positions on the detector")
        return ra, dec

    xf, yf = mesh(grid)  # (grid^2,) fit points
    xc, yc = mesh(2 * grid - 1)  # check points: the fit points and every midpoint between them
    ra_f, dec_f = sky(xf, yf)
    ra_c, dec_c = sky(xc, yc)
    const = crval is not None  # a given CRVAL needs A_0_0/B_0_0 to reach the detector centre
    if const and order == 1:
        raise ValueError("fit_tan_sip: order 1 (plain TAN) cannot honour a given CRVAL; use order >= 2")
    if crval is None:
        ra0, dec0 = sky(np.array([x0]), np.array([y0]))
        crval = (float(ra0[0]), float(dec0[0]))
    crval = (float(crval[0]) % 360.0, float(crval[1]))
    xi, eta = _gnomonic(ra_f, dec_f, crval)

    orders = [order] if order is not None else list(range(2, max(max_order, 2) + 1))
    best = None  # (rms, max, inverse max, header) of the most accurate order so far
    for k in orders:
        cd, fwd_terms, fwd, inv_terms, inv = _fit_order(xf - x0, yf - y0, xi, eta, k, const, su, sv)
        header = _header(nx, ny, (x0 + 1.0, y0 + 1.0), crval, cd, k, fwd_terms, fwd, inv_terms, inv)
        rms, mx, inv_max = measure_wcs_error(header, xc, yc, ra_c, dec_c)
        log.debug("TAN-SIP order %d: rms %.3g mas, max %.3g mas, inverse max %.3g px", k, rms, mx, inv_max)
        if best is None or rms < best[0]:
            best = (rms, mx, inv_max, header)
        if rms < target_mas:
            break
    else:
        if order is None:  # keep the best order (higher ones can be worse: noise, conditioning)
            log.warning("TAN-SIP approximation reaches only %.3g mas RMS (target %.3g) up to order %d",
                        best[0], target_mas, orders[-1])
    rms, mx, inv_max, header = best
    # 6 significant digits: the value reads back from the file exactly as returned.
    rms, mx, inv_max = (float(f"{v:.6g}") for v in (rms, mx, inv_max))
    header["JCAL_RMS"] = (rms, "[mas] RMS sky error of this WCS vs jcal model")
    header["JCAL_MAX"] = (mx, "[mas] max sky error of this WCS vs jcal model")
    header["JCAL_IMX"] = (inv_max, "[pix] max error of inverse SIP (AP/BP)")
    return header, rms


def write_wcs_fits(header: fits.Header, path: str | os.PathLike) -> None:
    """Write `header` as a header-only FITS file, atomically (temp file + rename).

    A data-less primary HDU must have NAXIS = 0, so the detector size moves from
    NAXIS1/NAXIS2 to IMAGEW/IMAGEH (the astrometry.net convention for WCS-only files).
    """
    path = Path(path)
    h = header.copy()
    for axis, key in (("NAXIS1", "IMAGEW"), ("NAXIS2", "IMAGEH")):
        if axis in h:
            h[key] = (h[axis], "detector size, pixels")
            del h[axis]
    hdu = fits.PrimaryHDU(header=h)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; the result should look like any file
    try:
        hdu.writeto(tmp, overwrite=True)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
