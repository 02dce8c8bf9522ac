"""TAN-SIP (and TPV) approximation of a fitted pixel -> sky mapping, for FITS headers.

jcal's astrometric models (per-detector and per-visit polynomials, proper motions, ...) are
richer than anything a FITS header can express. Tools that only read FITS WCSs (ds9,
astropy, the LSST butler's SIP-based exports) still need one, so for each detector-visit we
approximate the fitted mapping with a TAN-SIP WCS and record, in the header, how good the
approximation is (`JCAL_RMS`, `JCAL_MAX`, in mas, measured against the exact mapping on a grid
denser than the fit grid, with the coefficients as written to the header: the tests check this
numpy evaluation of the SIP convention against astropy's).

The fit: sky positions projected gnomonically about CRVAL (the visit's tangent point, or the
detector centre's sky position), then one linear least-squares fit of the intermediate world
coordinates as a polynomial of the pixel offsets from the detector centre, scaled to [-1, 1]
(raw offsets of ~2000 px to the 9th power would make it hopelessly ill-conditioned). That
polynomial is then re-expanded exactly (`wcs_poly`) about the pixel where it reaches the tangent
point, which becomes CRPIX (off the detector if need be, as SIP and TPV readers expect): the
linear part gives CD and the rest, mapped through CD^-1, the forward SIP coefficients A/B, all
of order >= 2, so a reader that ignores the distortion still lands within its size. The inverse
SIP (AP/BP, two orders higher) is fitted to the forward model so that sky -> pixel is fast and
consistent with pixel -> sky. The TPV variant (SCAMP's convention, degree <= 7) is the same
polynomial as a function of CD (u, v).

Everything is vectorised over many detector-visits of one detector size (`fit_tan_sip_many`):
they share the fit grid, hence the forward design matrix, and the cards are formatted in `fits_cards`
rather than through astropy's per-card machinery (thousands of headers per fit).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from astropy.io import fits

from ..sky import angle, unit_vectors
from .fits_cards import Card, _written, wcs_fits_bytes, write_wcs_fits  # noqa: F401 (write_wcs_fits re-exported)
from . import wcs_poly as wp

__all__ = ["fit_tan_sip", "fit_tan_sip_many", "fit_wcs_many", "write_wcs_fits", "wcs_fits_bytes", "WCS_KINDS", "tan_part"]

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


def _monomials(u: np.ndarray, v: np.ndarray, terms: list[tuple[int, int]]) -> np.ndarray:
    """u, v of any shape -> (..., k) matrix of u^p v^q, from tables of powers (no float pow)."""
    n = max(max(p, q) for p, q in terms)
    up, vp = np.ones((n + 1,) + u.shape), np.ones((n + 1,) + v.shape)
    for k in range(1, n + 1):
        up[k], vp[k] = up[k - 1] * u, vp[k - 1] * v
    return np.stack([up[p] * vp[q] for p, q in terms], axis=-1)


def _scales(terms: list[tuple[int, int]], su, sv) -> np.ndarray:
    """Factors turning coefficients of (u/su)^p (v/sv)^q into ones of raw u^p v^q: (k, 1) for
    scalar scales, (K, k, 1) for per-item (K,) scales."""
    su, sv = np.asarray(su, np.float64)[..., None], np.asarray(sv, np.float64)[..., None]
    p, q = np.array([t[0] for t in terms]), np.array([t[1] for t in terms])
    return (1.0 / (su**p * sv**q))[..., None]


def _fit_each(u: np.ndarray, v: np.ndarray, targets: np.ndarray, terms, su, sv) -> np.ndarray:
    """Least squares of (K, n, t) targets on a design per item, u, v (K, n), in scaled offsets
    (u/su, v/sv) with su, sv (K,). Batched QR: as well conditioned as the pseudo-inverse, 4x
    faster for thousands of items. Returns (K, len(terms), t) coefficients of raw u^p v^q."""
    q, r = np.linalg.qr(_monomials(u / su[:, None], v / sv[:, None], terms))  # (K, n, k), (K, k, k)
    return np.linalg.solve(r, np.einsum("bnk,bnt->bkt", q, targets)) * _scales(terms, su, sv)


# --------------------------------------------------------------------------- the fit


@dataclass(frozen=True)
class _Fitted:
    """One order's polynomial fit of K detector-visits of one size, re-expanded about CRPIX."""

    crpix: np.ndarray  # (K, 2) 1-based pixel of the tangent point, as written
    crval: np.ndarray  # (K, 2) deg
    cd: np.ndarray  # (K, 2, 2) [component, pixel axis], as written
    order: int
    raw: np.ndarray  # (K, n + 1, n + 1, 2): intermediate world coordinates [deg] of raw pixel offsets from CRPIX

    def offsets(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(n,) 0-based pixels -> (K, n) offsets from CRPIX."""
        return x + 1.0 - self.crpix[:, 0, None], y + 1.0 - self.crpix[:, 1, None]

    def linear(self, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(K, n) offsets -> CD (u, v), the linear part [deg]."""
        cd = self.cd
        return cd[:, 0, 0, None] * u + cd[:, 0, 1, None] * v, cd[:, 1, 0, None] * u + cd[:, 1, 1, None] * v

    def header_cards(self, k: int, nx: int, ny: int, ctype: str) -> list[Card]:
        cards: list[Card] = [
            ("NAXIS1", int(nx), "detector width, pixels"), ("NAXIS2", int(ny), "detector height, pixels"),
            ("WCSAXES", 2, ""), ("CTYPE1", f"RA---{ctype}", ""), ("CTYPE2", f"DEC--{ctype}", ""),
            ("CUNIT1", "deg", ""), ("CUNIT2", "deg", ""), ("RADESYS", "ICRS", ""),
            ("CRPIX1", float(self.crpix[k, 0]), "tangent point's pixel, 1-based"),
            ("CRPIX2", float(self.crpix[k, 1]), "tangent point's pixel, 1-based"),
            ("CRVAL1", float(self.crval[k, 0]), "tangent point"), ("CRVAL2", float(self.crval[k, 1]), "tangent point")]
        return cards + [(f"CD{i + 1}_{j + 1}", float(self.cd[k, i, j]), "") for i in range(2) for j in range(2)]


def _fit_polynomial(u, v, xi, eta, order: int, su: float, sv: float, centre, crval) -> _Fitted:
    """Fit (xi, eta) (K, n) [deg] as polynomials of order `order` in the pixel offsets u, v (n,) from
    the detector centre (scaled to [-1, 1]: well conditioned), then re-express them exactly about
    the pixel where they vanish, the tangent point's pixel (CRPIX, off the detector if need be), so
    that no term of order 0 remains and the linear part is CD."""
    exps = wp.terms(0, order)
    solve = np.linalg.pinv(_monomials(u / su, v / sv, exps))  # (k, n), once for all items
    d = wp.dense(np.einsum("kn,bnt->bkt", solve, np.stack([xi, eta], axis=-1)), exps, order)
    scale = np.array([su, sv])
    crpix = _written(np.asarray(centre) + 1.0 + wp.root(d) * scale)
    eye = np.broadcast_to(np.eye(2), (len(d), 2, 2))
    about = wp.compose_linear(d, eye, (crpix - 1.0 - np.asarray(centre)) / scale)  # about CRPIX as written
    about[:, 0, 0] = 0.0  # zero there up to the rounding of CRPIX (~1e-13 px): part of the measured error
    powers = np.arange(order + 1)
    raw = about / (su ** powers[:, None] * sv ** powers[None, :])[None, :, :, None]
    cd = _written(np.stack([raw[:, 1, 0], raw[:, 0, 1]], axis=2))
    return _Fitted(crpix, crval, cd, order, raw)


INVERSE_EXTRA_ORDER = 2  # AP/BP order above A/B's


@dataclass(frozen=True)
class _TanSip:
    """TAN-SIP: sky = TAN(CD (u + A(u, v), v + B(u, v))), A/B of order 2..n, inverse AP/BP too."""

    fit: _Fitted
    fwd_terms: list[tuple[int, int]]
    fwd: np.ndarray  # (K, k, 2) A|B
    inv_terms: list[tuple[int, int]]
    inv: np.ndarray  # (K, k', 2) AP|BP

    @classmethod
    def from_fit(cls, f: _Fitted, x: np.ndarray, y: np.ndarray) -> "_TanSip":
        """SIP of a fit; the inverse is fitted on the pixels x, y (n,)."""
        none = np.zeros((len(f.cd), 0, 2))
        if f.order < 2:
            return cls(f, [], none, [], none)
        fwd_terms = wp.terms(2, f.order)
        # xi = CD (u + A, v + B): the non-linear terms of (xi, eta), mapped through CD^-1
        fwd = _written(np.einsum("bkt,bst->bks", wp.pick(f.raw, fwd_terms), np.linalg.inv(f.cd)))
        wcs = cls(f, fwd_terms, fwd, [], none)
        # Inverse: u = U + AP(U, V) with (U, V) = (u + A, v + B), of order 2 and up only as the
        # forward's, two orders higher (the series converges more slowly where CRPIX is far off the
        # detector); (U, V) scaled per item.
        u, v = f.offsets(x, y)
        foc = wcs.focal(u, v)
        inv_terms = wp.terms(2, f.order + INVERSE_EXTRA_ORDER)
        su, sv = (np.maximum(np.abs(foc[..., i]).max(axis=1), 1.0) for i in (0, 1))
        inv = _fit_each(foc[..., 0], foc[..., 1], np.stack([u, v], axis=-1) - foc, inv_terms, su, sv)
        return cls(f, fwd_terms, fwd, inv_terms, _written(inv))

    def focal(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """(K, n) offsets from CRPIX -> (K, n, 2) offsets corrected by A/B: (u + A, v + B)."""
        uv = np.stack([u, v], axis=-1)
        if not self.fwd_terms:
            return uv
        return uv + np.einsum("bnk,bkt->bnt", _monomials(u, v, self.fwd_terms), self.fwd)

    def pixel_to_sky(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(n,) 0-based pixels -> (K, n) ra, dec, by the SIP convention."""
        foc = self.focal(*self.fit.offsets(x, y))
        return _tan_to_sky(*self.fit.linear(foc[..., 0], foc[..., 1]), self.fit.crval)

    def inverse_error_px(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """(K,) max pixel error of sky -> pixel through the linear WCS + AP/BP (no iteration)."""
        if not self.inv_terms:
            return np.zeros(self.fit.cd.shape[0])
        u, v = self.fit.offsets(x, y)
        foc = self.focal(u, v)  # what the linear inverse of the sky position gives
        back = foc.copy()
        up, vp = [np.ones_like(foc[..., 0])], [np.ones_like(foc[..., 1])]
        for _ in range(self.fit.order + INVERSE_EXTRA_ORDER):
            up.append(up[-1] * foc[..., 0])
            vp.append(vp[-1] * foc[..., 1])
        for t, (p, q) in enumerate(self.inv_terms):  # term by term: no (K, n, terms) temporary
            term = up[p] * vp[q]
            back[..., 0] += self.inv[:, t, 0, None] * term
            back[..., 1] += self.inv[:, t, 1, None] * term
        return np.max(np.hypot(back[..., 0] - u, back[..., 1] - v), axis=1)

    def cards(self, k: int, nx: int, ny: int) -> list[Card]:
        sip = bool(self.fwd_terms)
        cards = self.fit.header_cards(k, nx, ny, "TAN-SIP" if sip else "TAN")
        if sip:
            for name, terms, coef, n in (("A", self.fwd_terms, self.fwd[k, :, 0], self.fit.order),
                                         ("B", self.fwd_terms, self.fwd[k, :, 1], self.fit.order),
                                         ("AP", self.inv_terms, self.inv[k, :, 0], self.fit.order + INVERSE_EXTRA_ORDER),
                                         ("BP", self.inv_terms, self.inv[k, :, 1], self.fit.order + INVERSE_EXTRA_ORDER)):
                cards.append((f"{name}_ORDER", n, "SIP polynomial order"))
                cards += [(f"{name}_{p}_{q}", float(c), "") for (p, q), c in zip(terms, coef)]
        return cards


TPV_MAX_ORDER = 7  # the TPV convention's polynomial stops at degree 7 (PV1_39)


def _tpv_index() -> dict[tuple[int, int], int]:
    """(p, q) of x^p y^q -> TPV's PV index (1, x, y, r, x^2, xy, y^2, x^3, ..., r^3, x^4, ...)."""
    out, index = {}, 0
    for d in range(TPV_MAX_ORDER + 1):
        for p in range(d, -1, -1):
            out[(p, d - p)] = index
            index += 1
        index += d % 2  # the radial term r^d of odd degrees, unused here
    return out


_TPV_INDEX = _tpv_index()


@dataclass(frozen=True)
class _Tpv:
    """TPV (SCAMP): sky = TAN(P1(xi, eta), P2(eta, xi)) with (xi, eta) = CD (u, v)."""

    fit: _Fitted
    exps: list[tuple[int, int]]
    pv: np.ndarray  # (K, k, 2): coefficient of xi^p eta^q in each component (degrees)

    @classmethod
    def from_fit(cls, f: _Fitted) -> "_Tpv":
        k = len(f.cd)
        poly = wp.compose_linear(f.raw, np.linalg.inv(f.cd), np.zeros((k, 2)))  # of (xi, eta) = CD (u, v)
        exps = wp.terms(2, f.order)
        return cls(f, exps, _written(wp.pick(poly, exps)))

    def pixel_to_sky(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        xi, eta = self.fit.linear(*self.fit.offsets(x, y))
        if self.exps:
            extra = np.einsum("bnk,bkt->bnt", _monomials(xi, eta, self.exps), self.pv)
            xi, eta = xi + extra[..., 0], eta + extra[..., 1]
        return _tan_to_sky(xi, eta, self.fit.crval)

    def cards(self, k: int, nx: int, ny: int) -> list[Card]:
        cards = self.fit.header_cards(k, nx, ny, "TPV")
        cards += [("PV1_1", 1.0, "TPV: xi' = xi + ..."), ("PV2_1", 1.0, "TPV: eta' = eta + ...")]
        cards += [(f"PV1_{_TPV_INDEX[(p, q)]}", float(c), "") for (p, q), c in zip(self.exps, self.pv[k, :, 0])]
        # PV2 is a polynomial of (eta, xi): its x^a y^b is eta^a xi^b
        cards += [(f"PV2_{_TPV_INDEX[(q, p)]}", float(c), "") for (p, q), c in zip(self.exps, self.pv[k, :, 1])]
        return cards


WCS_KINDS = ("sip", "tpv")


def fit_wcs_many(sky_of_items: SkyOfItems, n_items: int, nx: int, ny: int, crval: np.ndarray | None = None,
                 order: int | None = None, grid: int = 50, max_order: int = 9, target_mas: float = 0.1,
                 kinds: tuple[str, ...] = ("sip",)) -> dict[str, tuple[list[list[Card]], np.ndarray]]:
    """Approximate the pixel -> sky maps of `n_items` detectors of nx x ny pixels by FITS WCSs.

    sky_of_items(item, x, y): (m,) item index and 0-based pixels -> (ra, dec) deg, vectorised
    over all items at once. crval: (n_items, 2) tangent points, or None for the sky position of
    each detector centre. CRPIX is the pixel of the tangent point (off the detector if need be),
    so the distortion polynomials have terms of order 2 and up only. order: polynomial order
    (1 = plain TAN); None picks, per item, the lowest order from 2 to max_order (7 for TPV)
    whose RMS error is below target_mas. grid: fit points per axis (the error is measured on a
    (2 grid - 1)^2 grid that also samples between fit points). kinds: "sip" (TAN-SIP with the
    inverse AP/BP) and/or "tpv".

    Returns {kind: (cards per item, (n_items,) RMS error in mas)}. The cards hold NAXIS1/2, the
    WCS, and JCAL_RMS / JCAL_MAX (the RMS and max sky error in mas, for the values as written)
    and for SIP JCAL_IMX (the max pixel error of the inverse AP/BP).
    """
    unknown = set(kinds) - set(WCS_KINDS)
    if unknown:
        raise ValueError(f"fit_wcs: unknown WCS kind(s) {sorted(unknown)}; choose from {list(WCS_KINDS)}")
    if nx < 1 or ny < 1:
        raise ValueError(f"fit_tan_sip: detector size must be positive, got {nx} x {ny}")
    if order is not None and order < 1:
        raise ValueError(f"fit_tan_sip: order must be >= 1, got {order}")
    highest = order if order is not None else max(max_order, 2)
    if grid < highest + INVERSE_EXTRA_ORDER + 2:  # the inverse needs more grid lines than its order
        raise ValueError(f"fit_tan_sip: grid = {grid} is too coarse for SIP order {highest}; "
                         f"use grid >= {highest + INVERSE_EXTRA_ORDER + 2}")
    x0, y0 = (nx - 1) / 2.0, (ny - 1) / 2.0  # 0-based centre
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
    if crval is None:
        ra0, dec0 = sky(np.array([x0]), np.array([y0]))
        crval = np.concatenate([ra0, dec0], axis=1)
    crval = np.array(crval, np.float64).reshape(n_items, 2)
    crval[:, 0] %= 360.0
    crval = _written(crval)
    xi, eta = _gnomonic(ra_f, dec_f, crval)

    out = {}
    for kind in kinds:
        top = TPV_MAX_ORDER if kind == "tpv" else max(max_order, 2)
        orders = [min(order, top)] if order is not None else list(range(2, min(max(max_order, 2), top) + 1))
        best_rms = np.full(n_items, np.inf)
        best: list[list[Card] | None] = [None] * n_items
        written_rms = np.zeros(n_items)
        todo = items
        for k in orders:
            f = _fit_polynomial(xf - x0, yf - y0, xi[todo], eta[todo], k, su, sv, (x0, y0), crval[todo])
            wcs = _TanSip.from_fit(f, xf, yf) if kind == "sip" else _Tpv.from_fit(f)
            sep = _separation_mas(*wcs.pixel_to_sky(xc, yc), ra_c[todo], dec_c[todo])  # (K, n)
            rms, mx = np.sqrt(np.mean(sep**2, axis=1)), sep.max(axis=1)
            inv_max = wcs.inverse_error_px(xc, yc) if kind == "sip" else None
            for j, item in enumerate(todo.tolist()):
                if rms[j] < best_rms[item]:  # higher orders can be worse (noise, conditioning): keep the best
                    best_rms[item] = rms[j]
                    quality = _quality_cards(rms[j], mx[j], None if inv_max is None else inv_max[j])
                    best[item] = wcs.cards(j, nx, ny) + quality
                    written_rms[item] = quality[0][1]
            todo = todo[rms >= target_mas]
            if todo.size == 0:
                break
        if todo.size and order is None:
            log.warning("%s approximation reaches only %.3g mas RMS (target %.3g) up to order %d for %d "
                        "detector(s)", kind.upper(), best_rms[todo].max(), target_mas, orders[-1], todo.size)
        out[kind] = (best, written_rms)
    return out


def _quality_cards(rms: float, mx: float, inv_max: float | None) -> list[Card]:
    # 6 significant digits: the value reads back from the file exactly as returned.
    rms, mx = (float(f"{v:.6g}") for v in (rms, mx))
    cards = [("JCAL_RMS", rms, "[mas] RMS sky error of this WCS vs jcal model"),
             ("JCAL_MAX", mx, "[mas] max sky error of this WCS vs jcal model")]
    if inv_max is not None:
        cards.append(("JCAL_IMX", float(f"{inv_max:.6g}"), "[pix] max error of inverse SIP (AP/BP)"))
    return cards


def tan_part(header: fits.Header) -> fits.Header:
    """The header as a reader that ignores SIP/TPV sees it: plain TAN, same CRPIX/CRVAL/CD (what
    the tests and `benchmarks/wcs_outputs.py` compare with the full WCS)."""
    out = header.copy()
    for key in list(out.keys()):
        if key.split("_")[0] in ("A", "B", "AP", "BP") or key.startswith("PV"):
            del out[key]
    out["CTYPE1"], out["CTYPE2"] = "RA---TAN", "DEC--TAN"
    return out


def fit_tan_sip_many(sky_of_items: SkyOfItems, n_items: int, nx: int, ny: int, crval: np.ndarray | None = None,
                     order: int | None = None, grid: int = 50, max_order: int = 9,
                     target_mas: float = 0.1) -> tuple[list[list[Card]], np.ndarray]:
    """TAN-SIP WCSs of `n_items` detectors: (cards per item, RMS error in mas); see `fit_wcs_many`."""
    return fit_wcs_many(sky_of_items, n_items, nx, ny, crval, order, grid, max_order, target_mas, ("sip",))["sip"]


def fit_tan_sip(pixel_to_sky: PixelToSky, nx: int, ny: int, crval: tuple[float, float] | None = None,
                order: int | None = None, grid: int = 50, max_order: int = 9,
                target_mas: float = 0.1, kind: str = "sip") -> tuple[fits.Header, float]:
    """Approximate one detector's `pixel_to_sky` (vectorised (x, y) 0-based pixels -> (ra, dec)
    deg) with a TAN-SIP (or, kind="tpv", TPV) WCS; see `fit_wcs_many`. Returns (astropy header,
    RMS error in mas)."""
    out = fit_wcs_many(lambda item, x, y: pixel_to_sky(x, y), 1, nx, ny,
                       None if crval is None else np.asarray([crval], np.float64), order, grid, max_order,
                       target_mas, (kind,))
    cards, rms = out[kind]
    return fits.Header(cards[0]), float(rms[0])
