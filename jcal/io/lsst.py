"""Read LSST pipeline outputs (what jointcal reads) into a `jcal.data.InputData`.

What: `read_lsst` assembles, from a folder laid out like ``tests/data/cfht_minimal``::

    sources/*.parquet                   sourceTable_visit or per-detector sourceTable (required)
    visitSummary/<visit>.fits           afw ExposureCatalog per visit (required: band, epoch,
                                        bbox, PhotoCalib, SkyWcs)
    calexp_headers/<visit>_<det>_image.hdr   calexp IMAGE headers (optional; TAN-SIP WCS)
    refcat/<name>/config.py, <htm>.fits LSST HTM-sharded reference catalog (required)
    camera/*.fits                       afw Camera (optional)

an `LsstInputs`: the `InputData` a fit consumes (``.data``), plus what `InputData` has no room
for -- per-detector selection counts (``.counts``), the visitSummary PhotoCalib first guesses
(``.photo_calib``, nJy per count), VisitInfo (``.visit_info``: boresights, exposure ids), the
refcat flags (``.refcat.resolved``), where each first-guess WCS came from (``.wcs_origin``) and
the reference-loading circle (``.bounding_circle``).

Why: jcal is jointcal's successor; starting from exactly jointcal's inputs (same source cuts, same
first-guess WCS, same reference stars) makes the two directly comparable. No LSST software is
needed: parquet via pyarrow, FITS via astropy, and -- optionally -- AST via ``starlink-pyast``
to decode the persisted SkyWcs (see `jcal.io.lsst_wcs`).

First-guess WCS, ``wcs_source``:

* ``"auto"`` (default): the visitSummary SkyWcs if ``starlink-pyast`` is importable (what
  jointcal uses; converted to a TAN-SIP checked to < ``tol_mas``), else the calexp header;
  if neither is usable `InputError` says which optional package or file is needed;
* ``"visitSummary"``: the SkyWcs only (needs ``starlink-pyast``);
* ``"calexp"``: the calexp headers only.

Reference stars are those within jointcal's bounding circle of the ccd-visits that kept at
least one source (`jointcal_bounding_circle`); on cfht_minimal that is 346 stars, jointcal's
``photometry_collected_refStars``.

The lower-level pieces are re-exported here: `read_lsst_sources`, `LsstSourceSelection`,
`SelectionCounts`, `read_visit_summary`, `wcs_from_calexp_header`, `tan_sip_from_ast`,
`read_skywcs_file`, `ast_available`, `read_lsst_refcat`, `htm_index`,
`htm_trixels_in_circle`.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
from astropy.io import fits
from astropy.wcs import WCS
from astropy.wcs.utils import proj_plane_pixel_scales

from jcal.data import Camera, CcdVisit, InputData, InputError, VisitTable, reading
from jcal.io.lsst_refcat import (
    LsstRefcat,
    RefcatShards,
    bounding_circle,
    htm_index,
    htm_trixel_vertices,
    htm_trixels_in_circle,
    read_lsst_refcat,
    read_refcat_config,
    to_radec,
    unit_vector,
)
from jcal.io.lsst_sources import (
    COLUMN_ALIASES,
    DEFAULT_BAD_FLAGS,
    LsstSourceSelection,
    SelectionCounts,
    read_lsst_sources,
)
from jcal.io.lsst_wcs import (
    AST_PACKAGE,
    CcdSummary,
    PhotoCalibGuess,
    VisitInfo,
    ast_available,
    ast_pixel_to_sky,
    fit_tan_sip,
    read_skywcs_file,
    read_visit_summary,
    tan_sip_from_ast,
    wcs_from_calexp_header,
    wcs_max_separation_mas,
)

log = logging.getLogger("jcal.io.lsst")

__all__ = [
    "AST_PACKAGE",
    "COLUMN_ALIASES",
    "DEFAULT_BAD_FLAGS",
    "CcdSummary",
    "LsstInputs",
    "LsstPaths",
    "LsstRefcat",
    "LsstSourceSelection",
    "RefcatShards",
    "PhotoCalibGuess",
    "SelectionCounts",
    "VisitInfo",
    "ast_available",
    "ast_pixel_to_sky",
    "fit_tan_sip",
    "htm_index",
    "htm_trixel_vertices",
    "htm_trixels_in_circle",
    "jointcal_bounding_circle",
    "read_afw_camera",
    "read_lsst",
    "read_lsst_refcat",
    "read_lsst_sources",
    "read_refcat_config",
    "read_skywcs_file",
    "read_visit_summary",
    "tan_sip_from_ast",
    "wcs_from_calexp_header",
    "wcs_max_separation_mas",
]

_HEADER_NAME = re.compile(r"^(\d+)_(\d+)(?:_image)?\.(?:hdr|txt|fits)$")


@dataclass(frozen=True)
class LsstPaths:
    """Explicit inputs, for data not laid out as `from_folder` expects.

    Each entry is a path or the same content in memory (as a data butler hands it over):
    a source table as a ``pyarrow.Table``, a visitSummary as an ``astropy.io.fits.HDUList``,
    the refcat as a `RefcatShards`, a calexp header as an ``astropy.io.fits.Header``.
    """

    sources: tuple[Path | pa.Table, ...]
    visit_summaries: tuple[Path | fits.HDUList, ...]
    refcat: Path | RefcatShards  # an LSST refcat folder (config.py + <htm>.fits), or its shards
    calexp_headers: dict[tuple[int, int], Path | fits.Header] = field(default_factory=dict)  # (visit, det)
    camera: Path | None = None

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, refcat_name: str | None = None) -> "LsstPaths":
        folder = Path(folder)
        if not folder.is_dir():
            raise InputError(f"{folder}: input folder not found")

        def need_dir(name: str) -> Path:
            p = folder / name
            if not p.is_dir():
                raise InputError(f"{folder}: required sub-folder {name}/ is missing")
            return p

        sources = tuple(sorted(p for p in need_dir("sources").iterdir() if p.suffix in (".parquet", ".parq")))
        if not sources:
            raise InputError(f"{folder / 'sources'}: no .parquet source tables")
        summaries = tuple(sorted(need_dir("visitSummary").glob("*.fits")))
        if not summaries:
            raise InputError(f"{folder / 'visitSummary'}: no visitSummary .fits files")
        refcats = sorted(p for p in need_dir("refcat").iterdir() if p.is_dir())
        if refcat_name is not None:
            refcats = [p for p in refcats if p.name == refcat_name]
        if len(refcats) != 1:
            what = f"named {refcat_name!r}" if refcat_name else "(pass refcat_name to choose)"
            raise InputError(f"{folder / 'refcat'}: expected one refcat folder {what}, found "
                             f"{[p.name for p in refcats]}")
        headers: dict[tuple[int, int], Path] = {}
        hdr_dir = folder / "calexp_headers"
        if hdr_dir.is_dir():
            for p in sorted(hdr_dir.iterdir()):
                m = _HEADER_NAME.match(p.name)
                if m:
                    headers[(int(m.group(1)), int(m.group(2)))] = p
        cam_dir = folder / "camera"
        cams = sorted(cam_dir.glob("*.fits")) if cam_dir.is_dir() else []
        return cls(sources=sources, visit_summaries=summaries, refcat=refcats[0],
                   calexp_headers=headers, camera=cams[0] if cams else None)


@dataclass(frozen=True)
class LsstInputs:
    """`read_lsst`'s result: the fit input plus LSST-specific side information."""

    data: InputData
    counts: SelectionCounts  # per (visit, detector): rows read, dropped per cut, kept
    photo_calib: dict[tuple[int, int], PhotoCalibGuess]  # first guess, nJy per count
    visit_info: dict[int, VisitInfo]  # visit -> boresight, exposure id, ...
    refcat: LsstRefcat  # the reference catalog (same as data.refcat) with its flags
    bounding_circle: tuple[float, float, float]  # (ra, dec, radius) deg used to load the refcat
    wcs_origin: dict[tuple[int, int], str]  # (visit, det) -> "visitSummary" | "calexp"
    wcs_error_mas: dict[tuple[int, int], float]  # TAN-SIP vs AST (0 for calexp headers)
    summaries: dict[tuple[int, int], CcdSummary]  # visitSummary rows

    @property
    def boresights(self) -> dict[int, tuple[float, float]]:
        return {v: (vi.boresight_ra, vi.boresight_dec) for v, vi in self.visit_info.items()}


# --------------------------------------------------------------------------------------------
# Bounding circle
# --------------------------------------------------------------------------------------------

def jointcal_bounding_circle(data: InputData | LsstInputs,
                             boresights: dict[int, tuple[float, float]] | None = None,
                             ) -> tuple[float, float, float]:
    """(ra, dec, radius) in degrees of the circle jointcal loads reference stars in.

    jointcal (``Associations::computeBoundingCircle``, see `jcal.io.lsst_refcat.bounding_circle`)
    bounds every ccd-visit that kept sources, on the plane tangent at the "common tangent
    point" = normalised mean of the ccd-visits' boresight unit vectors (one term per
    ccd-visit, so a visit counts as often as it has detectors). Boresights come from
    `boresights` (visit -> (ra, dec) deg) or from an `LsstInputs`' VisitInfo; without either,
    the detector centres stand in for them (an approximation: the circle then differs slightly).
    Pixel boxes are (0, 0)..(nx - 1, ny - 1), jointcal's inclusive bbox corners.
    """
    if isinstance(data, LsstInputs):
        boresights = boresights or data.boresights
        data = data.data
    return _bounding_circle_of(data.sources, data.ccd_visits, boresights)


def _bounding_circle_of(sources, ccd_visits: dict[tuple[int, int], CcdVisit],
                        boresights: dict[int, tuple[float, float]] | None) -> tuple[float, float, float]:
    pairs = np.unique(np.stack([sources.visit, sources.detector], axis=1), axis=0)
    ccds = [ccd_visits[(int(v), int(d))] for v, d in pairs]
    vecs = []
    for ccd in ccds:
        if boresights is not None:
            if ccd.visit not in boresights:
                raise InputError(f"bounding circle: no boresight for visit {ccd.visit}")
            vecs.append(unit_vector(*boresights[ccd.visit]))
        else:
            vecs.append(unit_vector(*ccd.wcs.all_pix2world(0.5 * (ccd.nx - 1), 0.5 * (ccd.ny - 1), 0)))
    tra, tdec = to_radec(np.sum(vecs, axis=0))

    def footprint(ccd: CcdVisit):
        return (lambda x, y: ccd.wcs.all_pix2world(x, y, 0)), (0, 0, ccd.nx - 1, ccd.ny - 1)

    return bounding_circle((footprint(c) for c in ccds), (float(tra), float(tdec)))


# --------------------------------------------------------------------------------------------
# Camera (optional)
# --------------------------------------------------------------------------------------------

def read_afw_camera(path: str | os.PathLike, detectors: Iterable[int],
                    pixel_scale: dict[int, float]) -> Camera:
    """Nominal geometry of `detectors` from an afw Camera FITS file.

    The focal-plane centre of each detector is ``fpPosition`` (the focal-plane position of
    ``refPoint``) moved from ``refPoint`` to the bbox centre by the detector's yaw (pitch and
    roll, zero for every camera jointcal supports, are ignored). afw cameras have no plate
    scale, so `pixel_scale` (arcsec/px, e.g. from the first-guess WCSs) is supplied.
    """
    path = Path(path)
    want = [int(d) for d in detectors]
    with reading(path, "afw Camera file"), fits.open(path) as hdul:
        hdu = next((h for h in hdul if isinstance(h, fits.BinTableHDU)
                    and "fpPosition_x" in h.columns.names), None)
        if hdu is None:
            raise InputError(f"{path}: no Detector table (with fpPosition_x) in this afw Camera file")
        d = hdu.data
        need = ("id", "bbox_min_x", "bbox_min_y", "bbox_max_x", "bbox_max_y", "pixelSize_x", "pixelSize_y",
                "fpPosition_x", "fpPosition_y", "refPoint_x", "refPoint_y", "yaw")
        for c in need:
            if c not in d.columns.names:
                raise InputError(f"{path}: camera column {c!r} is missing")
        cols = {c: np.asarray(d[c]) for c in need}  # numeric columns only (VLA strings are not read)
    rows = []
    for det in want:
        hit = np.flatnonzero(cols["id"] == det)
        if hit.size == 0:
            raise InputError(f"{path}: detector {det} is not in the camera")
        if det not in pixel_scale:
            raise InputError(f"camera: no pixel scale for detector {det}")
        i = hit[0]
        cx = 0.5 * (cols["bbox_min_x"][i] + cols["bbox_max_x"][i])
        cy = 0.5 * (cols["bbox_min_y"][i] + cols["bbox_max_y"][i])
        dx = (cx - cols["refPoint_x"][i]) * cols["pixelSize_x"][i]
        dy = (cy - cols["refPoint_y"][i]) * cols["pixelSize_y"][i]
        c, s = np.cos(cols["yaw"][i]), np.sin(cols["yaw"][i])
        rows.append((det, cols["fpPosition_x"][i] + c * dx - s * dy, cols["fpPosition_y"][i] + s * dx + c * dy,
                     int(cols["bbox_max_x"][i] - cols["bbox_min_x"][i] + 1),
                     int(cols["bbox_max_y"][i] - cols["bbox_min_y"][i] + 1), pixel_scale[det]))
    arr = list(zip(*rows))
    return Camera(detector=arr[0], focal_x=arr[1], focal_y=arr[2], nx=arr[3], ny=arr[4], pixel_scale=arr[5])


# --------------------------------------------------------------------------------------------
# read_lsst
# --------------------------------------------------------------------------------------------

def _first_guess_wcs(key, summary: CcdSummary | None, header: Path | None, wcs_source: str,
                     tol_mas: float) -> tuple[WCS, int, int, str, float]:
    """(wcs, nx, ny, origin, error_mas) of one ccd-visit, following `wcs_source`."""
    what = f"visit {key[0]} detector {key[1]}"
    have_ast = summary is not None and summary.skywcs_ast is not None
    use_ast = wcs_source == "visitSummary" or (wcs_source == "auto" and have_ast and ast_available())
    if use_ast:
        if not have_ast:
            raise InputError(f"{what}: no SkyWcs in the visitSummary (wcs_source='visitSummary')")
        wcs, err = tan_sip_from_ast(summary.skywcs_ast, summary.bbox, tol_mas=tol_mas,
                                    what=f"{what} ({Path(summary.source).name})")
        return wcs, summary.nx, summary.ny, "visitSummary", err
    if header is None:
        if wcs_source == "calexp":
            raise InputError(f"{what}: no calexp header (wcs_source='calexp')")
        if have_ast:
            raise InputError(f"{what}: its first-guess WCS is only available as an afw SkyWcs (AST); "
                             f"install the optional package {AST_PACKAGE!r} or provide calexp headers")
        raise InputError(f"{what}: no first-guess WCS: neither a visitSummary SkyWcs nor a calexp header")
    wcs, nx, ny = wcs_from_calexp_header(header)
    if summary is not None:
        if (nx, ny) != (summary.nx, summary.ny) and nx and ny:
            raise InputError(f"{what}: calexp header size {nx}x{ny} != visitSummary bbox "
                             f"{summary.nx}x{summary.ny} ({header})")
        nx, ny = summary.nx, summary.ny
    if not (nx and ny):
        raise InputError(f"{what}: unknown detector size (no NAXIS1/2 in {header} and no visitSummary)")
    return wcs, nx, ny, "calexp", 0.0


def read_lsst(folder_or_paths: str | os.PathLike | LsstPaths, *, reference_error_mas: float | None = None,
              flux_type: str = "apFlux_12_0",
              selection: LsstSourceSelection | None = LsstSourceSelection(),
              wcs_source: Literal["auto", "visitSummary", "calexp"] = "auto",
              refcat_name: str | None = None, tol_mas: float = 1.0,
              read_camera: bool = True) -> LsstInputs:
    """Read LSST outputs into an `LsstInputs` (``.data`` is the `InputData`).

    Parameters
    ----------
    folder_or_paths
        A folder laid out as in the module docstring, or an `LsstPaths`.
    reference_error_mas
        Reference position error per coordinate (mas); overrides the refcat's errors and is
        required when it has none (jointcal's ``astrometryReferenceErr``).
    flux_type, selection
        See `read_lsst_sources`.
    wcs_source
        ``"auto"``, ``"visitSummary"`` or ``"calexp"`` (module docstring).
    refcat_name
        Which ``refcat/<name>/`` to use when there are several.
    tol_mas
        Largest allowed TAN-SIP-vs-AST deviation over a detector.
    read_camera
        Read ``camera/*.fits`` when present.
    """
    if wcs_source not in ("auto", "visitSummary", "calexp"):
        raise InputError(f"wcs_source = {wcs_source!r}: expected 'auto', 'visitSummary' or 'calexp'")
    paths = folder_or_paths if isinstance(folder_or_paths, LsstPaths) else LsstPaths.from_folder(
        folder_or_paths, refcat_name)

    sources, counts = read_lsst_sources(list(paths.sources), flux_type, selection)
    if len(sources) == 0:
        raise InputError(f"sources: no source survived the selection (drops: {counts.drops()})")

    summaries: dict[tuple[int, int], CcdSummary] = {}
    for p in paths.visit_summaries:
        for row in read_visit_summary(p):
            summaries[(row.visit, row.detector)] = row

    pairs = [(int(v), int(d)) for v, d in np.unique(np.stack([sources.visit, sources.detector], 1), axis=0)]
    ccd_visits: dict[tuple[int, int], CcdVisit] = {}
    origin: dict[tuple[int, int], str] = {}
    errors: dict[tuple[int, int], float] = {}
    photo: dict[tuple[int, int], PhotoCalibGuess] = {}
    for key in pairs:
        summary = summaries.get(key)
        if summary is None:
            raise InputError(f"visitSummary: no row for visit {key[0]} detector {key[1]}, which has "
                             f"{counts.kept(*key)} selected source(s)")
        if summary.bbox[:2] != (0, 0):
            raise InputError(f"visit {key[0]} detector {key[1]}: bbox starts at {summary.bbox[:2]}, "
                             f"not (0, 0); jcal's CcdVisit assumes pixels 0..nx-1")
        wcs, nx, ny, org, err = _first_guess_wcs(key, summary, paths.calexp_headers.get(key), wcs_source, tol_mas)
        ccd_visits[key] = CcdVisit(visit=key[0], detector=key[1], wcs=wcs, nx=nx, ny=ny)
        origin[key], errors[key] = org, err
        if summary.photo_calib is not None:
            photo[key] = summary.photo_calib
    log.info("first-guess WCS: %s", {k: (origin[k], round(errors[k], 6)) for k in pairs})

    visit_ids = sorted({k[0] for k in pairs})
    vinfo: dict[int, VisitInfo] = {}
    bands = []
    for v in visit_ids:
        rows = [s for k, s in summaries.items() if k[0] == v]
        infos = [s.visit_info for s in rows if s.visit_info is not None]
        if not infos:
            raise InputError(f"visitSummary: visit {v} has no VisitInfo (needed for its epoch)")
        vinfo[v] = infos[0]
        vb = {s.band for s in rows}
        if len(vb) != 1:
            raise InputError(f"visitSummary: visit {v} has several bands {sorted(vb)}")
        bands.append(vb.pop())
    visits = VisitTable(visit=visit_ids, mjd=[vinfo[v].mjd for v in visit_ids], band=bands,
                        exptime=[vinfo[v].exptime for v in visit_ids],
                        airmass=[vinfo[v].airmass for v in visit_ids])

    boresights = {v: (vi.boresight_ra, vi.boresight_dec) for v, vi in vinfo.items()}
    # InputData needs the refcat, which needs the circle: bound the ccd-visits directly.
    circle = _bounding_circle_of(sources, ccd_visits, boresights)
    log.info("jointcal bounding circle: centre (%.6f, %.6f) deg, radius %.5f deg", *circle)
    refcat = read_lsst_refcat(paths.refcat, *circle, reference_error_mas=reference_error_mas)

    camera = None
    if read_camera and paths.camera is not None:
        dets = sorted({k[1] for k in pairs})
        scale = {d: float(np.median([np.mean(proj_plane_pixel_scales(ccd_visits[k].wcs)) * 3600
                                     for k in pairs if k[1] == d])) for d in dets}
        camera = read_afw_camera(paths.camera, dets, scale)

    data = InputData(sources=sources, ccd_visits=ccd_visits, refcat=refcat.catalog, visits=visits, camera=camera,
                     origin=None if isinstance(folder_or_paths, LsstPaths) else str(folder_or_paths))
    return LsstInputs(data=data, counts=counts, photo_calib=photo, visit_info=vinfo, refcat=refcat,
                      bounding_circle=circle, wcs_origin=origin, wcs_error_mas=errors,
                      summaries={k: summaries[k] for k in pairs})

