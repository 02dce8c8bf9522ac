"""First-guess WCS, photometric calibration and visit metadata from LSST pipeline outputs.

What:

* `wcs_from_calexp_header` -- an astropy TAN-SIP WCS from a calexp ``IMAGE`` header (text
  or FITS), shifted so that it takes LSST parent-image pixels with ``origin=0``.
* `read_visit_summary` -- the per-detector rows of a ``visitSummary`` afw ExposureCatalog:
  bbox, the persisted SkyWcs (an AST FrameSet dump), PhotoCalib (``calibrationMean`` /
  ``calibrationErr``, nJy per count) and VisitInfo (mid-exposure MJD(TAI), exposure time,
  airmass, boresight).
* `read_skywcs_file` -- the AST text of a standalone afw ``SkyWcs`` FITS file (e.g. jointcal's
  ``jointcal_wcs`` outputs).
* `tan_sip_from_ast` -- an astropy TAN-SIP approximation of an AST SkyWcs, fitted by least
  squares on a grid over the detector and checked against AST.

Why: jointcal starts from the visitSummary SkyWcs. Evaluating it exactly needs the AST library
(PyPI ``starlink-pyast``), an *optional* dependency of jcal: when it is importable the FrameSet
is decoded and approximated by a TAN-SIP (order 4 about the detector centre, residual checked to
be below ``tol_mas``, 1 mas by default); when it is not, callers fall back to the calexp header,
which agrees with the SkyWcs to ~0.2 mas on the cfht_minimal data.

Pixel convention: LSST pixels are 0-based ((0, 0) is the centre of the first pixel), FITS
pixels 1-based. Every WCS returned here is meant to be evaluated with ``origin=0`` on LSST
parent-image pixel coordinates; ``CRPIX`` inside it is (as always in astropy) 1-based.

The afw "archive" layout read here: a FITS file whose ``ARCHIVE_INDEX`` HDU maps an archive id
(the integer stored in e.g. the visitSummary ``wcs`` column) to a catalog number
(``cat.archive``, matching the ``AR_CATN`` header card of an ``ARCHIVE_DATA`` HDU) and rows
``row0 .. row0 + nrows - 1`` in it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS, Sip

from jcal.data import InputError, reading
from jcal.sky import unit_vectors
from jcal_models import sky_to_tangent

log = logging.getLogger("jcal.io.lsst")

__all__ = [
    "AST_PACKAGE",
    "CcdSummary",
    "PhotoCalibGuess",
    "VisitInfo",
    "ast_available",
    "ast_pixel_to_sky",
    "fit_tan_sip",
    "read_skywcs_file",
    "read_visit_summary",
    "tan_sip_from_ast",
    "wcs_from_calexp_header",
    "wcs_max_separation_mas",
]

AST_PACKAGE = "starlink-pyast"  # PyPI name of the optional AST binding (imports as starlink.Ast)
MJD_UNIX_EPOCH = 40587.0  # MJD of 1970-01-01T00:00:00; VisitInfo "tai" counts ns (TAI) from it


# --------------------------------------------------------------------------------------------
# Small spherical helpers (degrees in, degrees out)
# --------------------------------------------------------------------------------------------

def _separation_mas(ra1, dec1, ra2, dec2) -> np.ndarray:
    """Angular separation in mas (haversine-free vector form, accurate at mas scales)."""
    u, v = unit_vectors(ra1, dec1), unit_vectors(ra2, dec2)
    return np.degrees(2 * np.arcsin(np.clip(np.linalg.norm(u - v, axis=-1) / 2, 0, 1))) * 3.6e6


# --------------------------------------------------------------------------------------------
# Calexp headers
# --------------------------------------------------------------------------------------------

def _read_header(header_or_path) -> tuple[fits.Header, str]:
    if isinstance(header_or_path, fits.Header):
        return header_or_path, "header"
    path = Path(header_or_path)
    if not path.exists():
        raise InputError(f"{path}: header file not found")
    try:
        if path.suffix.lower() in (".fits", ".fz", ".fit"):
            with fits.open(path) as hdul:
                hdu = next((h for h in hdul if h.header.get("CTYPE1", "").startswith("RA")), None)
                if hdu is None:
                    raise InputError(f"{path}: no HDU with a celestial WCS (CTYPE1 = 'RA---...')")
                return hdu.header.copy(), str(path)
        return fits.Header.fromtextfile(str(path)), str(path)
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"{path}: cannot read a FITS header: {exc}") from exc


def wcs_from_calexp_header(header_or_path) -> tuple[WCS, int, int]:
    """Celestial WCS (origin 0, LSST parent pixels), NAXIS1, NAXIS2 of a calexp image header.

    A calexp cut from a larger image has an origin XY0 != 0 (``LTV1/2 = -XY0``, or the
    alternate WCS ``CRVAL1A/2A = XY0``); catalog x, y are parent-image pixels, so CRPIX is
    shifted by XY0 to make the WCS take parent pixels directly.
    """
    header, src = _read_header(header_or_path)
    with reading(src, "calexp header"):  # header values of the wrong type, too
        for key in ("CTYPE1", "CTYPE2", "CRPIX1", "CRPIX2", "CRVAL1", "CRVAL2"):
            if key not in header:
                raise InputError(f"{src}: WCS keyword {key!r} is missing")
        if header.get("CTYPE1A", "").strip() == "LINEAR" and "CRVAL1A" in header:
            x0, y0 = float(header["CRVAL1A"]), float(header.get("CRVAL2A", 0.0))
        else:
            x0, y0 = -float(header.get("LTV1", 0.0)), -float(header.get("LTV2", 0.0))
        try:
            # key=" ": the primary celestial WCS only; the alternate "A" WCS is a pixel-offset helper.
            wcs = WCS(header, key=" ", relax=True)
        except Exception as exc:
            raise InputError(f"{src}: cannot build a WCS: {exc}") from exc
        if not wcs.has_celestial or wcs.naxis != 2:
            raise InputError(f"{src}: the header WCS is not a 2-d celestial WCS")
        if x0 or y0:
            wcs.wcs.crpix = wcs.wcs.crpix + np.array([x0, y0])
            if wcs.sip is not None:
                wcs.sip = Sip(wcs.sip.a, wcs.sip.b, wcs.sip.ap, wcs.sip.bp, wcs.wcs.crpix)
            wcs.wcs.set()
        nx = int(header.get("NAXIS1", header.get("ZNAXIS1", 0)))
        ny = int(header.get("NAXIS2", header.get("ZNAXIS2", 0)))
        return wcs, nx, ny


# --------------------------------------------------------------------------------------------
# afw archives (visitSummary, SkyWcs files)
# --------------------------------------------------------------------------------------------

class _AfwArchive:
    """Look up persisted objects by archive id in an afw FITS archive."""

    def __init__(self, hdul: fits.HDUList, src: str):
        self.src = src
        self.hdul = hdul
        index_at = None
        for i, hdu in enumerate(hdul):
            if hdu.header.get("EXTTYPE", hdu.header.get("EXTNAME", "")) == "ARCHIVE_INDEX":
                index_at = i
                break
        if index_at is None:
            raise InputError(f"{src}: no ARCHIVE_INDEX HDU (not an afw archive)")
        self.index = hdul[index_at].data
        ncat = int(hdul[index_at].header.get("AR_NCAT", len(hdul) - index_at))
        self.catalogs: dict[int, fits.BinTableHDU] = {}
        for hdu in hdul[index_at + 1:index_at + ncat]:
            catn = hdu.header.get("AR_CATN")
            if catn is not None:
                self.catalogs[int(catn)] = hdu

    def rows(self, archive_id: int, expected: str):
        """(table data, row slice) of the object with `archive_id`, checking its class name."""
        hits = self.index[self.index["id"] == archive_id]
        if len(hits) == 0:
            raise InputError(f"{self.src}: archive id {archive_id} ({expected}) not in ARCHIVE_INDEX")
        first = hits[np.argmin(hits["cat.persistable"])]
        name = str(first["name"]).strip()
        if name != expected:
            raise InputError(f"{self.src}: archive id {archive_id} is a {name!r}, expected {expected!r}")
        hdu = self.catalogs.get(int(first["cat.archive"]))
        if hdu is None:
            raise InputError(f"{self.src}: archive catalog {int(first['cat.archive'])} for {expected} is missing")
        row0, nrows = int(first["row0"]), int(first["nrows"])
        return hdu.data, slice(row0, row0 + nrows)


def _ast_text_from_bytes(raw, src: str) -> str:
    text = bytes(np.asarray(raw, dtype=np.uint8)).decode("ascii", errors="replace")
    if "Begin FrameSet" not in text:
        raise InputError(f"{src}: the SkyWcs blob holds no AST FrameSet")
    return text[text.index("Begin FrameSet"):]


def read_skywcs_file(path: str | os.PathLike) -> str:
    """AST FrameSet text of a standalone afw-persisted SkyWcs FITS file (first SkyWcs in it)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: SkyWcs file not found")
    with reading(path, "SkyWcs file"), fits.open(path) as hdul:
        arch = _AfwArchive(hdul, str(path))
        ids = arch.index["id"][np.char.strip(np.asarray(arch.index["name"]).astype(str)) == "SkyWcs"]
        if len(ids) == 0:
            raise InputError(f"{path}: no SkyWcs in the archive")
        data, rows = arch.rows(int(ids[0]), "SkyWcs")
        return _ast_text_from_bytes(data["wcs"][rows.start], str(path))


@dataclass(frozen=True)
class PhotoCalibGuess:
    """A detector's single-frame photometric calibration: calibrated flux = instFlux * mean (nJy)."""

    mean: float  # nJy per count
    err: float  # nJy per count
    is_constant: bool  # False: the calibration varies over the detector (only the mean is read)


@dataclass(frozen=True)
class VisitInfo:
    """The VisitInfo fields jcal uses; angles in degrees, mjd is mid-exposure MJD(TAI)."""

    visit: int
    exposure_id: int
    mjd: float
    exptime: float
    airmass: float
    boresight_ra: float
    boresight_dec: float


@dataclass(frozen=True)
class CcdSummary:
    """One row of a visitSummary: a detector in a visit."""

    visit: int
    detector: int
    band: str
    physical_filter: str
    bbox: tuple[int, int, int, int]  # inclusive min_x, min_y, max_x, max_y (pixels)
    skywcs_ast: str | None  # AST FrameSet text of the SkyWcs, None when absent
    photo_calib: PhotoCalibGuess | None
    visit_info: VisitInfo | None
    source: str  # file it came from

    @property
    def nx(self) -> int:
        return self.bbox[2] - self.bbox[0] + 1

    @property
    def ny(self) -> int:
        return self.bbox[3] - self.bbox[1] + 1


def _col(data, names: tuple[str, ...], src: str):
    for n in names:
        if n in data.columns.names:
            return data[n]
    raise InputError(f"{src}: required column {names[0]!r} is missing")


def read_visit_summary(path: str | os.PathLike | fits.HDUList, name: str | None = None) -> list[CcdSummary]:
    """Every detector row of a visitSummary FITS file (afw ExposureCatalog).

    `path` may also be the file already opened as an ``astropy.io.fits.HDUList`` (e.g. from a
    data butler); `name` then labels it in messages.
    """
    if isinstance(path, fits.HDUList):
        src = name or "<in-memory visitSummary>"
        with reading(src, "visitSummary"):
            return _visit_summary_rows(path, src, Path(src))
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: visitSummary not found")
    with reading(path, "visitSummary"), fits.open(path) as hdul:
        return _visit_summary_rows(hdul, str(path), path)


def _visit_summary_rows(hdul: fits.HDUList, src: str, path: Path) -> list[CcdSummary]:
    out: list[CcdSummary] = []
    if len(hdul) < 2 or not isinstance(hdul[1], fits.BinTableHDU):
        raise InputError(f"{src}: HDU 1 is not the visitSummary row table")
    main = hdul[1].data
    arch = _AfwArchive(hdul, src)
    names = main.columns.names
    det = _col(main, ("id",), src)
    visit = _col(main, ("visit",), src)
    band = _col(main, ("band",), src)
    phys = main["physical_filter"] if "physical_filter" in names else band
    bb = [_col(main, (f"bbox_{k}",), src) for k in ("min_x", "min_y", "max_x", "max_y")]
    for i in range(len(main)):
        wcs_id = int(main["wcs"][i]) if "wcs" in names else 0
        pc_id = int(main["photoCalib"][i]) if "photoCalib" in names else 0
        vi_id = int(main["visitInfo"][i]) if "visitInfo" in names else 0
        ast_text = None
        if wcs_id:
            data, rows = arch.rows(wcs_id, "SkyWcs")
            ast_text = _ast_text_from_bytes(data["wcs"][rows.start], src)
        photo = None
        if pc_id:
            data, rows = arch.rows(pc_id, "PhotoCalib")
            r = data[rows.start]
            flags = np.atleast_1d(np.asarray(r["flags"], dtype=bool))
            photo = PhotoCalibGuess(mean=float(r["calibrationMean"]), err=float(r["calibrationErr"]),
                                    is_constant=bool(flags[0]) if flags.size else True)
            if not photo.is_constant:
                log.info("%s detector %d: PhotoCalib varies over the detector; using its mean %.6g",
                         path.name, int(det[i]), photo.mean)
        vinfo = None
        if vi_id:
            data, rows = arch.rows(vi_id, "VisitInfo")
            r = data[rows.start]
            mjd = MJD_UNIX_EPOCH + int(r["tai"]) / 86400e9
            vinfo = VisitInfo(
                visit=int(visit[i]), exposure_id=int(r["exposureid"]), mjd=mjd,
                exptime=float(r["exposuretime"]), airmass=float(r["boresightairmass"]),
                boresight_ra=float(np.degrees(r["boresightradec_ra"]) % 360.0),
                boresight_dec=float(np.degrees(r["boresightradec_dec"])),
            )
        out.append(CcdSummary(
            visit=int(visit[i]), detector=int(det[i]), band=str(band[i]).strip(),
            physical_filter=str(phys[i]).strip(),
            bbox=tuple(int(b[i]) for b in bb), skywcs_ast=ast_text, photo_calib=photo,
            visit_info=vinfo, source=src,
        ))
    return out


# --------------------------------------------------------------------------------------------
# AST (optional) and the TAN-SIP approximation
# --------------------------------------------------------------------------------------------

def _import_ast():
    try:
        import starlink.Ast as Ast  # noqa: N813  (optional dependency)
    except ImportError:
        return None
    return Ast


def ast_available() -> bool:
    """True when the optional AST binding (``starlink-pyast``) is importable."""
    return _import_ast() is not None


def ast_pixel_to_sky(ast_text: str, *, what: str = "SkyWcs") -> Callable[[np.ndarray, np.ndarray], tuple]:
    """A function (x, y) LSST pixels -> (ra, dec) degrees evaluating an AST SkyWcs exactly.

    Raises `InputError` naming ``starlink-pyast`` when AST is not importable.
    """
    Ast = _import_ast()
    if Ast is None:
        raise InputError(f"{what}: decoding an afw SkyWcs (AST FrameSet) needs the optional package "
                         f"{AST_PACKAGE!r} (pip install {AST_PACKAGE}); or give calexp headers instead")
    try:
        fs = Ast.Channel(ast_text.splitlines()).read()
    except Exception as exc:
        raise InputError(f"{what}: cannot parse the AST FrameSet: {exc}") from exc
    if fs is None or not hasattr(fs, "getframe"):
        raise InputError(f"{what}: the AST text does not hold a FrameSet")
    base, cur = fs.getframe(Ast.BASE), fs.getframe(Ast.CURRENT)
    if base.Domain != "PIXELS" or not cur.isaskyframe():
        raise InputError(f"{what}: expected a PIXELS -> SKY FrameSet, got {base.Domain} -> {cur.Domain}")

    def pix_to_sky(x, y):
        x, y = np.broadcast_arrays(np.asarray(x, float), np.asarray(y, float))
        out = fs.tran(np.stack([x.ravel(), y.ravel()]))
        ra = np.degrees(out[0]).reshape(x.shape) % 360.0
        dec = np.degrees(out[1]).reshape(x.shape)
        return ra, dec

    return pix_to_sky


def _poly_terms(order: int, min_total: int) -> list[tuple[int, int]]:
    return [(p, t - p) for t in range(min_total, order + 1) for p in range(t, -1, -1)]


def _design(u, v, terms):
    return np.stack([u ** p * v ** q for p, q in terms], axis=1)


def wcs_max_separation_mas(wcs: WCS, pix_to_sky, bbox: tuple[int, int, int, int], n: int = 33) -> float:
    """Largest separation (mas) between `wcs` (origin 0) and `pix_to_sky` over the bbox."""
    x0, y0, x1, y1 = bbox
    # An n x n grid offset from the fitting grid, edges included.
    gx, gy = np.meshgrid(np.linspace(x0 - 0.5, x1 + 0.5, n), np.linspace(y0 - 0.5, y1 + 0.5, n))
    ra1, dec1 = pix_to_sky(gx.ravel(), gy.ravel())
    ra2, dec2 = wcs.all_pix2world(gx.ravel(), gy.ravel(), 0)
    return float(np.max(_separation_mas(ra1, dec1, ra2, dec2)))


def fit_tan_sip(pix_to_sky, bbox: tuple[int, int, int, int], order: int = 4, *, n_grid: int = 40,
                inverse_order: int | None = None) -> WCS:
    """Least-squares TAN-SIP fit (origin 0) to any pixel -> sky function over a detector bbox.

    The tangent point is the sky position of the bbox centre, CRPIX the centre itself, so the
    fit has no constant term: xi, eta = polynomial(u, v) of total degree 1..`order` in
    u = x - x_c, v = y - y_c; its linear part is CD and the rest, mapped back by CD^-1, the
    forward SIP A/B. The inverse SIP AP/BP (degree 0..`inverse_order`, default order + 1) is fitted
    on the same grid so that ``wcs_world2pix`` works too.
    """
    x0, y0, x1, y1 = bbox
    xc, yc = 0.5 * (x0 + x1), 0.5 * (y0 + y1)
    gx, gy = np.meshgrid(np.linspace(x0 - 0.5, x1 + 0.5, n_grid), np.linspace(y0 - 0.5, y1 + 0.5, n_grid))
    gx, gy = gx.ravel(), gy.ravel()
    ra, dec = pix_to_sky(gx, gy)
    ra_c, dec_c = pix_to_sky(np.array([xc]), np.array([yc]))
    ra_c, dec_c = float(ra_c[0]), float(dec_c[0])
    xi, eta = sky_to_tangent(ra, dec, ra_c, dec_c, xp=np)

    scale = max(0.5 * (x1 - x0 + 1), 0.5 * (y1 - y0 + 1))  # conditioning: fit in [-1, 1]
    u, v = (gx - xc) / scale, (gy - yc) / scale
    terms = _poly_terms(order, 1)
    m = _design(u, v, terms)
    coef, *_ = np.linalg.lstsq(m, np.stack([xi, eta], axis=1), rcond=None)
    powers = np.array([p + q for p, q in terms], dtype=float)
    coef = coef / scale ** powers[:, None]  # back to pixel units
    lin = {t: coef[i] for i, t in enumerate(terms)}
    cd = np.array([[lin[(1, 0)][0], lin[(0, 1)][0]], [lin[(1, 0)][1], lin[(0, 1)][1]]])
    cd_inv = np.linalg.inv(cd)
    a = np.zeros((order + 1, order + 1))
    b = np.zeros((order + 1, order + 1))
    for (p, q), c in lin.items():
        if p + q >= 2:
            a[p, q], b[p, q] = cd_inv @ c

    # Inverse: u = U + AP(U, V) with (U, V) = CD^-1 (xi, eta).
    inv_order = order + 1 if inverse_order is None else inverse_order
    uu, vv = cd_inv @ np.stack([xi, eta])
    iterms = _poly_terms(inv_order, 0)
    mi = _design(uu / scale, vv / scale, iterms)
    icoef, *_ = np.linalg.lstsq(mi, np.stack([gx - xc - uu, gy - yc - vv], axis=1), rcond=None)
    ipow = np.array([p + q for p, q in iterms], dtype=float)
    icoef = icoef / scale ** ipow[:, None]
    ap = np.zeros((inv_order + 1, inv_order + 1))
    bp = np.zeros((inv_order + 1, inv_order + 1))
    for i, (p, q) in enumerate(iterms):
        ap[p, q], bp[p, q] = icoef[i]

    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"]
    wcs.wcs.crpix = [xc + 1.0, yc + 1.0]  # FITS 1-based
    wcs.wcs.crval = [ra_c, dec_c]
    wcs.wcs.cd = cd
    wcs.wcs.radesys = "ICRS"
    wcs.sip = Sip(a, b, ap, bp, wcs.wcs.crpix)
    wcs.pixel_shape = (x1 - x0 + 1, y1 - y0 + 1)
    wcs.wcs.set()
    return wcs


def tan_sip_from_ast(ast_text: str, bbox: tuple[int, int, int, int], *, order: int = 4,
                     tol_mas: float = 1.0, max_order: int = 7, what: str = "SkyWcs") -> tuple[WCS, float]:
    """TAN-SIP approximation of an AST SkyWcs over `bbox`, and its max deviation from AST (mas).

    Starts at `order` (4) and raises the order up to `max_order` until the deviation over
    the bbox is below `tol_mas`; raises `InputError` if it never is (an exotic distortion).
    A visitSummary SkyWcs is a TAN-SIP already, so order 4 reproduces it to ~1e-6 mas.
    """
    pix_to_sky = ast_pixel_to_sky(ast_text, what=what)
    err = np.inf
    for k in range(order, max_order + 1):
        wcs = fit_tan_sip(pix_to_sky, bbox, k)
        err = wcs_max_separation_mas(wcs, pix_to_sky, bbox)
        if err < tol_mas:
            if k > order:
                log.info("%s: TAN-SIP order %d needed to reach %.3g mas (got %.3g)", what, k, tol_mas, err)
            return wcs, err
    raise InputError(f"{what}: a TAN-SIP of order <= {max_order} deviates from the AST SkyWcs by "
                     f"{err:.3g} mas (> {tol_mas} mas) over bbox {bbox}")
