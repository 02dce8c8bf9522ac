"""TAN-SIP approximation of a fitted pixel -> sky mapping, for FITS headers.

jcal's astrometric models (per-detector and per-visit polynomials, proper motions, ...) are
richer than anything a FITS header can express. Tools that only read FITS WCSs (ds9,
astropy, the LSST butler's SIP-based exports) still need one, so for each detector-visit we
approximate the fitted mapping with a TAN-SIP WCS and record, in the header, how good the
approximation is (`JCAL_RMS`, `JCAL_MAX`, in mas, measured against the exact mapping on a grid
denser than the fit grid, with the coefficients as written to the header: the tests check this
numpy evaluation of the SIP convention against astropy's).

The fit: CRPIX at the detector centre, CRVAL the sky position there (or a given one), sky
positions projected gnomonically about CRVAL, then one linear least-squares fit of the
intermediate world coordinates as a polynomial of the pixel offsets (u, v). The linear
part gives CD; the rest, mapped through CD^-1, gives the forward SIP coefficients A/B.
Pixel offsets are scaled to [-1, 1] in the design matrix (raw offsets of ~2000 px to the
9th power would make it hopelessly ill-conditioned) and the coefficients converted back
to SIP's raw-pixel convention afterwards. The inverse SIP (AP/BP, one order higher) is fitted
to the forward model so that sky -> pixel is fast and consistent with pixel -> sky.

Everything is vectorised over many detector-visits of one detector size (`fit_tan_sip_many`):
they share the fit grid, hence the forward design matrix, and the cards are formatted here
rather than through astropy's per-card machinery (thousands of headers per fit).
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits

from ..sky import angle, unit_vectors

__all__ = ["fit_tan_sip", "fit_tan_sip_many", "write_wcs_fits", "wcs_fits_bytes"]

log = logging.getLogger("jcal.io.sip")

_MAS_PER_RAD = 180.0 / np.pi * 3600.0e3

PixelToSky = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]
SkyOfItems = Callable[[np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


# --------------------------------------------------------------------------- geometry


def _separation_mas(ra1, dec1, ra2, dec2) -> np.ndarray:
    """Angular separation in mas; atan2 form, accurate down to ~1e-8 mas."""
    return angle(unit_vectors(ra1, dec1), unit_vectors(ra2, dec2)) * _MAS_PER_RAD


def _tangent_frames(crval: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(K, 2) tangent points [deg] -> (K, 3) centre, east and north unit vectors."""
    a0, d0 = np.radians(crval[:, 0]), np.radians(crval[:, 1])
    centre = np.stack([np.cos(d0) * np.cos(a0), np.cos(d0) * np.sin(a0), np.sin(d0)], axis=1)
    east = np.stack([-np.sin(a0), np.cos(a0), np.zeros_like(a0)], axis=1)
    north = np.stack([-np.sin(d0) * np.cos(a0), -np.sin(d0) * np.sin(a0), np.cos(d0)], axis=1)
    return centre, east, north


def _gnomonic(ra_deg: np.ndarray, dec_deg: np.ndarray, crval: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(K, n) sky positions -> FITS TAN intermediate world coordinates (deg) about (K, 2) crval."""
    p = unit_vectors(ra_deg, dec_deg)  # (K, n, 3)
    centre, east, north = _tangent_frames(crval)
    w = np.einsum("knc,kc->kn", p, centre)
    if np.any(w <= 0):
        raise ValueError("fit_tan_sip: part of the detector is 90 deg or more from CRVAL")
    return (np.degrees(np.einsum("knc,kc->kn", p, east) / w),
            np.degrees(np.einsum("knc,kc->kn", p, north) / w))


def _tan_to_sky(xi: np.ndarray, eta: np.ndarray, crval: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of `_gnomonic`: (K, n) intermediate world coordinates [deg] -> (ra, dec) [deg]."""
    centre, east, north = _tangent_frames(crval)
    p = (centre[:, None, :] + np.radians(xi)[..., None] * east[:, None, :]
         + np.radians(eta)[..., None] * north[:, None, :])
    ra = np.degrees(np.arctan2(p[..., 1], p[..., 0])) % 360.0
    dec = np.degrees(np.arctan2(p[..., 2], np.hypot(p[..., 0], p[..., 1])))
    return ra, dec


# --------------------------------------------------------------------------- polynomials


def _terms(lo: int, hi: int) -> list[tuple[int, int]]:
    """Exponents (p, q) of u^p v^q with lo <= p + q <= hi."""
    return [(p, d - p) for d in range(lo, hi + 1) for p in range(d, -1, -1)]


def _monomials(u: np.ndarray, v: np.ndarray, terms: list[tuple[int, int]]) -> np.ndarray:
    """u, v of any shape -> (..., k) matrix of u^p v^q, from tables of powers (no float pow)."""
    n = max(max(p, q) for p, q in terms)
    up, vp = np.ones((n + 1,) + u.shape), np.ones((n + 1,) + v.shape)
    for k in range(1, n + 1):
        up[k], vp[k] = up[k - 1] * u, vp[k - 1] * v
    return np.stack([up[p] * vp[q] for p, q in terms], axis=-1)


def _scales(terms: list[tuple[int, int]], su: float, sv: float) -> np.ndarray:
    """(k, 1) factors turning coefficients of (u/su)^p (v/sv)^q into ones of raw u^p v^q."""
    return 1.0 / np.array([su**p * sv**q for p, q in terms])[:, None]


def _fit_shared(u: np.ndarray, v: np.ndarray, targets: np.ndarray, terms, su: float, sv: float) -> np.ndarray:
    """Least squares of (K, n, t) targets on one (n,) design, in scaled offsets (u/su, v/sv).

    Returns (K, len(terms), t) coefficients of raw u^p v^q. The SVD pseudo-inverse of the
    scaled design (entries in [-1, 1]) avoids normal equations' squared condition number.
    """
    solve = np.linalg.pinv(_monomials(u / su, v / sv, terms))  # (k, n), once for all items
    return np.einsum("kn,bnt->bkt", solve, targets) * _scales(terms, su, sv)


def _fit_each(u: np.ndarray, v: np.ndarray, targets: np.ndarray, terms, su: float, sv: float) -> np.ndarray:
    """Like `_fit_shared`, with a design per item: u, v (K, n). Batched QR: as well
    conditioned as the pseudo-inverse, 4x faster for thousands of items."""
    q, r = np.linalg.qr(_monomials(u / su, v / sv, terms))  # (K, n, k), (K, k, k)
    return np.linalg.solve(r, np.einsum("bnk,bnt->bkt", q, targets)) * _scales(terms, su, sv)


# --------------------------------------------------------------------------- FITS cards


def _format_float(value: float) -> str:
    """A FITS fixed-format real of at most 20 characters, as precise as that allows."""
    value = float(value)
    text = repr(value).upper()
    if len(text) <= 20 and "." in text and "N" not in text:  # the common case, already valid
        return text
    if not np.isfinite(value):
        raise ValueError(f"a FITS header value must be finite, got {value}")
    mantissa, _, exponent = text.partition("E")
    if "." not in mantissa:
        text = mantissa + ".0" + ("E" + exponent if exponent else "")
    # too long for the value field: the most significant digits "-d.dddE+XX" holds in 20
    digits = 14 - (value < 0)
    while len(text) > 20:  # (a 3-digit exponent, or rounding up to one, takes a digit more)
        text = f"{value:.{digits}E}"
        digits -= 1
    return text


def _written(values: np.ndarray) -> np.ndarray:
    """The values as a reader will get them back from the header (20-character reals)."""
    values = np.asarray(values, np.float64)
    # a value whose shortest repr fits the field is written exactly; only the others round
    flat = [v if len(repr(v)) <= 20 and math.isfinite(v) else float(_format_float(v)) for v in values.ravel().tolist()]
    return np.array(flat, np.float64).reshape(values.shape)


def _card(key: str, value, comment: str = "") -> str:
    """One 80-character FITS header card."""
    if isinstance(value, bool):
        text = f"{'T' if value else 'F':>20}"
    elif isinstance(value, (int, np.integer)):
        text = f"{int(value):>20}"
    elif isinstance(value, str):
        text = f"{chr(39) + value.replace(chr(39), chr(39) * 2).ljust(8) + chr(39):<20}"
    else:
        text = f"{_format_float(value):>20}"
    card = f"{key:<8}= {text}" + (f" / {comment}" if comment else "")
    if len(key) > 8 or len(f"{key:<8}= {text}") > 80:
        raise ValueError(f"FITS card {key!r} = {value!r} does not fit 80 characters")
    return card[:80].ljust(80)


Card = tuple[str, Any, str]  # (keyword, value, comment)


def wcs_fits_bytes(cards: list[Card]) -> bytes:
    """A header-only FITS file holding `cards`.

    A data-less primary HDU must have NAXIS = 0, so the detector size moves from
    NAXIS1/NAXIS2 to IMAGEW/IMAGEH (the astrometry.net convention for WCS-only files).
    """
    renamed = {"NAXIS1": "IMAGEW", "NAXIS2": "IMAGEH"}
    lines = [_card("SIMPLE", True, "conforms to FITS standard"), _card("BITPIX", 8, "array data type"),
             _card("NAXIS", 0, "number of array dimensions"), _card("EXTEND", True)]
    lines += [_card(renamed.get(k, k), v, "detector size, pixels" if k in renamed else c) for k, v, c in cards
              if k not in ("SIMPLE", "BITPIX", "NAXIS", "EXTEND", "END")]
    text = "".join(lines) + "END".ljust(80)
    return (text + " " * (-len(text) % 2880)).encode("ascii")


def write_wcs_fits(header: fits.Header | list[Card], path: str | os.PathLike) -> None:
    """Write a WCS header (or its cards) as a header-only FITS file, atomically (temp + rename)."""
    cards = [(c.keyword, c.value, c.comment) for c in header.cards] if isinstance(header, fits.Header) else header
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(wcs_fits_bytes(cards))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; the result should look like any file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------- the fit


@dataclass(frozen=True)
class _TanSip:
    """TAN-SIP WCSs of K detector-visits of one detector size, with written-precision values."""

    crpix: tuple[float, float]  # 1-based
    crval: np.ndarray  # (K, 2) deg
    cd: np.ndarray  # (K, 2, 2)
    order: int
    fwd_terms: list[tuple[int, int]]
    fwd: np.ndarray  # (K, k, 2) A|B
    inv_terms: list[tuple[int, int]]
    inv: np.ndarray  # (K, k', 2) AP|BP

    def pixel_to_sky(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(n,) 0-based pixels -> (K, n) ra, dec, by the SIP convention."""
        u, v = x + 1.0 - self.crpix[0], y + 1.0 - self.crpix[1]
        foc = self.focal(u, v)
        xi = self.cd[:, 0, 0, None] * foc[..., 0] + self.cd[:, 0, 1, None] * foc[..., 1]
        eta = self.cd[:, 1, 0, None] * foc[..., 0] + self.cd[:, 1, 1, None] * foc[..., 1]
        return _tan_to_sky(xi, eta, self.crval)

    def focal(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """(n,) offsets from CRPIX -> (K, n, 2) offsets corrected by A/B: (u + f, v + g)."""
        uv = np.stack([u, v], axis=-1)
        if not self.fwd_terms:
            return np.broadcast_to(uv, (self.cd.shape[0],) + uv.shape)
        return uv + np.einsum("nk,bkt->bnt", _monomials(u, v, self.fwd_terms), self.fwd)

    def inverse_error_px(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """(K,) max pixel error of sky -> pixel through the linear WCS + AP/BP (no iteration)."""
        if self.order < 2:
            return np.zeros(self.cd.shape[0])
        u, v = x + 1.0 - self.crpix[0], y + 1.0 - self.crpix[1]
        foc = self.focal(u, v)  # what the linear inverse of the sky position gives
        back = foc.copy()
        top = self.order + 1
        up, vp = [np.ones_like(foc[..., 0])], [np.ones_like(foc[..., 1])]
        for _ in range(top):
            up.append(up[-1] * foc[..., 0])
            vp.append(vp[-1] * foc[..., 1])
        for t, (p, q) in enumerate(self.inv_terms):  # term by term: no (K, n, terms) temporary
            term = up[p] * vp[q]
            back[..., 0] += self.inv[:, t, 0, None] * term
            back[..., 1] += self.inv[:, t, 1, None] * term
        return np.max(np.hypot(back[..., 0] - u, back[..., 1] - v), axis=1)

    def cards(self, k: int, nx: int, ny: int) -> list[Card]:
        sip = self.order >= 2
        cards: list[Card] = [
            ("NAXIS1", int(nx), "detector width, pixels"), ("NAXIS2", int(ny), "detector height, pixels"),
            ("WCSAXES", 2, ""), ("CTYPE1", "RA---TAN-SIP" if sip else "RA---TAN", ""),
            ("CTYPE2", "DEC--TAN-SIP" if sip else "DEC--TAN", ""), ("CUNIT1", "deg", ""), ("CUNIT2", "deg", ""),
            ("RADESYS", "ICRS", ""), ("CRPIX1", self.crpix[0], "detector centre, 1-based"),
            ("CRPIX2", self.crpix[1], "detector centre, 1-based"),
            ("CRVAL1", float(self.crval[k, 0]), ""), ("CRVAL2", float(self.crval[k, 1]), "")]
        cards += [(f"CD{i + 1}_{j + 1}", float(self.cd[k, i, j]), "") for i in range(2) for j in range(2)]
        if sip:
            for name, terms, coef, n in (("A", self.fwd_terms, self.fwd[k, :, 0], self.order),
                                         ("B", self.fwd_terms, self.fwd[k, :, 1], self.order),
                                         ("AP", self.inv_terms, self.inv[k, :, 0], self.order + 1),
                                         ("BP", self.inv_terms, self.inv[k, :, 1], self.order + 1)):
                cards.append((f"{name}_ORDER", n, "SIP polynomial order"))
                cards += [(f"{name}_{p}_{q}", float(c), "") for (p, q), c in zip(terms, coef)]
        return cards


def _fit_order(u, v, xi, eta, order: int, const: bool, su: float, sv: float, crpix, crval) -> _TanSip:
    """Fit CD, forward SIP (order) and inverse SIP (order + 1) to tangent-plane positions.

    u, v: (n,) pixel offsets from CRPIX; xi, eta: (K, n) intermediate world coordinates (deg).
    """
    terms = ([(0, 0)] if const else []) + _terms(1, order)
    coef = _fit_shared(u, v, np.stack([xi, eta], axis=-1), terms, su, sv)  # (K, k, 2)
    cd = _written(np.stack([coef[:, terms.index((1, 0))], coef[:, terms.index((0, 1))]], axis=2))  # (K, 2, 2)
    fwd_terms = [t for t in terms if t not in ((1, 0), (0, 1))] if order >= 2 or const else []
    # xi = CD (u + f, v + g): the non-linear terms of (xi, eta), mapped through CD^-1.
    fwd = np.zeros((len(cd), 0, 2))
    if fwd_terms:
        rest = np.stack([coef[:, terms.index(t)] for t in fwd_terms], axis=1)  # (K, k, 2)
        fwd = _written(np.einsum("bkt,bst->bks", rest, np.linalg.inv(cd)))
    wcs = _TanSip(crpix, crval, cd, order, fwd_terms, fwd, [], np.zeros((len(cd), 0, 2)))
    if order < 2:
        return wcs
    # Inverse: u = U + AP(U, V) with (U, V) = (u + f, v + g), on the same grid.
    foc = wcs.focal(u, v)
    inv_terms = _terms(0, order + 1)
    inv = _fit_each(foc[..., 0], foc[..., 1], np.stack([u, v], axis=-1) - foc, inv_terms, su, sv)
    return _TanSip(crpix, crval, cd, order, fwd_terms, fwd, inv_terms, _written(inv))


def fit_tan_sip_many(sky_of_items: SkyOfItems, n_items: int, nx: int, ny: int, crval: np.ndarray | None = None,
                     order: int | None = None, grid: int = 50, max_order: int = 9,
                     target_mas: float = 0.1) -> tuple[list[list[Card]], np.ndarray]:
    """Approximate the pixel -> sky maps of `n_items` detectors of nx x ny pixels by TAN-SIP WCSs.

    sky_of_items(item, x, y): (m,) item index and 0-based pixels -> (ra, dec) deg, vectorised
    over all items at once. crval: (n_items, 2) tangent points, or None for the sky position of
    each detector centre. order: SIP order of the forward polynomial (1 = plain TAN, no SIP);
    None picks, per item, the lowest order from 2 to max_order whose RMS error is below
    target_mas. grid: fit points per axis (the error is measured on a (2 grid - 1)^2 grid that
    also samples between fit points).

    Returns (cards per item, (n_items,) RMS error in mas). The cards hold NAXIS1/2, the WCS
    (CD + A/B + AP/BP), and JCAL_RMS / JCAL_MAX / JCAL_IMX: the RMS and max sky error in mas
    and the max pixel error of the inverse SIP, for the values as written.
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
    items = np.arange(n_items)

    def mesh(n: int) -> tuple[np.ndarray, np.ndarray]:
        gx, gy = np.meshgrid(np.linspace(-0.5, nx - 0.5, n), np.linspace(-0.5, ny - 0.5, n))
        return gx.ravel(), gy.ravel()

    def sky(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(n,) pixels -> (n_items, n) sky positions, one call for all items."""
        shape = (n_items, x.size)
        ra, dec = sky_of_items(np.repeat(items, x.size), np.tile(x, n_items), np.tile(y, n_items))
        ra, dec = np.asarray(ra, np.float64).reshape(shape), np.asarray(dec, np.float64).reshape(shape)
        if not (np.all(np.isfinite(ra)) and np.all(np.isfinite(dec))):
            raise ValueError("fit_tan_sip: pixel_to_sky returned non-finite positions on the detector")
        return ra, dec

    xc, yc = mesh(2 * grid - 1)  # check points: the fit points and every midpoint between them
    ra_c, dec_c = sky(xc, yc)
    fit_points = (np.arange(2 * grid - 1)[:, None] % 2 == 0) & (np.arange(2 * grid - 1)[None, :] % 2 == 0)
    fit_points = fit_points.ravel()  # (grid^2,) of them: every other check point on both axes
    xf, yf, ra_f, dec_f = xc[fit_points], yc[fit_points], ra_c[:, fit_points], dec_c[:, fit_points]
    const = crval is not None  # a given CRVAL needs A_0_0/B_0_0 to reach the detector centre
    if const and order == 1:
        raise ValueError("fit_tan_sip: order 1 (plain TAN) cannot honour a given CRVAL; use order >= 2")
    if crval is None:
        ra0, dec0 = sky(np.array([x0]), np.array([y0]))
        crval = np.concatenate([ra0, dec0], axis=1)
    crval = np.array(crval, np.float64).reshape(n_items, 2)
    crval[:, 0] %= 360.0
    crval = _written(crval)
    xi, eta = _gnomonic(ra_f, dec_f, crval)

    orders = [order] if order is not None else list(range(2, max(max_order, 2) + 1))
    best_rms = np.full(n_items, np.inf)
    best: list[list[Card] | None] = [None] * n_items
    todo = items
    for k in orders:
        wcs = _fit_order(xf - x0, yf - y0, xi[todo], eta[todo], k, const, su, sv, (x0 + 1.0, y0 + 1.0),
                         crval[todo])
        sep = _separation_mas(*wcs.pixel_to_sky(xc, yc), ra_c[todo], dec_c[todo])  # (K, n)
        rms, mx, inv_max = np.sqrt(np.mean(sep**2, axis=1)), sep.max(axis=1), wcs.inverse_error_px(xc, yc)
        for j, item in enumerate(todo.tolist()):
            log.debug("TAN-SIP item %d order %d: rms %.3g mas, max %.3g mas, inverse max %.3g px",
                      item, k, rms[j], mx[j], inv_max[j])
            if rms[j] < best_rms[item]:  # higher orders can be worse (noise, conditioning): keep the best
                best_rms[item] = rms[j]
                best[item] = wcs.cards(j, nx, ny) + _quality_cards(rms[j], mx[j], inv_max[j])
        todo = todo[rms >= target_mas]
        if todo.size == 0:
            break
    if todo.size and order is None:
        log.warning("TAN-SIP approximation reaches only %.3g mas RMS (target %.3g) up to order %d for %d "
                    "detector(s)", best_rms[todo].max(), target_mas, orders[-1], todo.size)
    return best, np.array([c[-3][1] for c in best])


def _quality_cards(rms: float, mx: float, inv_max: float) -> list[Card]:
    # 6 significant digits: the value reads back from the file exactly as returned.
    rms, mx, inv_max = (float(f"{v:.6g}") for v in (rms, mx, inv_max))
    return [("JCAL_RMS", rms, "[mas] RMS sky error of this WCS vs jcal model"),
            ("JCAL_MAX", mx, "[mas] max sky error of this WCS vs jcal model"),
            ("JCAL_IMX", inv_max, "[pix] max error of inverse SIP (AP/BP)")]


def fit_tan_sip(pixel_to_sky: PixelToSky, nx: int, ny: int, crval: tuple[float, float] | None = None,
                order: int | None = None, grid: int = 50, max_order: int = 9,
                target_mas: float = 0.1) -> tuple[fits.Header, float]:
    """Approximate one detector's `pixel_to_sky` (vectorised (x, y) 0-based pixels -> (ra, dec)
    deg) with a TAN-SIP WCS; see `fit_tan_sip_many`. Returns (astropy header, RMS error in mas)."""
    cards, rms = fit_tan_sip_many(lambda item, x, y: pixel_to_sky(x, y), 1, nx, ny,
                                  None if crval is None else np.asarray([crval], np.float64), order, grid,
                                  max_order, target_mas)
    return fits.Header(cards[0]), float(rms[0])
