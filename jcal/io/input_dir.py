"""jcal's input directory format: read it into an `InputData`, write one from an `InputData`.

A jcal input directory holds::

    sources.parquet            one row per detection (or sources.fits)
    wcs/<visit>_<detector>.fits  first-guess celestial WCS of each detector-visit
    refcat.parquet             reference catalog (or refcat.fits)
    visits.ecsv                one row per visit (or visits.parquet / visits.fits)
    camera.ecsv                optional nominal camera geometry (or .parquet / .fits)

Column names and units are documented in `read_input`. The reader is strict on purpose: a
missing file, a missing (or misspelled) column, a NaN in a required column or a WCS that is
not celestial raises `jcal.data.InputError` naming the file and the column, so that bad
input fails at the door rather than deep inside a solver. Only the columns jcal needs are
read from Parquet files (catalogs from pipelines carry hundreds). Nothing in an input file
is ever executed: no pickle, and ECSV headers are parsed by astropy's safe YAML loader.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS, FITSFixedWarning, Sip, Wcsprm

from jcal.arrays import unique_rows
from jcal.data import (Camera, CcdVisit, InputData, InputError, ReferenceCatalog, SourceCatalog,
                       VisitTable)
from jcal.io.atomic import atomic_output_dir
from jcal.io.sip import wcs_fits_bytes

__all__ = ["read_input", "write_input", "write_input_files", "wcs_filename", "AB_ZERO_POINT_NJY"]

log = logging.getLogger("jcal.io")

# AB magnitude of a 1 nJy source: m = -2.5 log10(f / nJy) + 31.4.
AB_ZERO_POINT_NJY = 31.4

# Source-table column (file name) -> SourceCatalog field.
_SOURCE_COLUMNS = {
    "visit": "visit", "detector": "detector", "x": "x", "y": "y", "xErr": "x_err", "yErr": "y_err",
    "instFlux": "inst_flux", "instFluxErr": "inst_flux_err",
}
_REFCAT_REQUIRED = ("ra", "dec", "ra_err", "dec_err")
_REFCAT_OPTIONAL = ("pmra", "pmdec", "pmra_err", "pmdec_err", "epoch", "id")
_VISIT_REQUIRED = ("visit", "mjd", "band")
_VISIT_OPTIONAL = ("exptime", "airmass")
_CAMERA_REQUIRED = ("detector", "focal_x", "focal_y", "nx", "ny", "pixel_scale")
_INT_COLUMNS = {"visit", "detector", "source_id", "flags", "id", "nx", "ny"}


def wcs_filename(visit: int, detector: int) -> str:
    """Name of a detector-visit's WCS file inside ``wcs/``."""
    return f"{int(visit)}_{int(detector)}.fits"


# --------------------------------------------------------------------------------------------
# Tables: one small reader over Parquet / ECSV / FITS with strict, named column errors.
# --------------------------------------------------------------------------------------------


@dataclass
class _TableFile:
    """An input table file: its column names, its file-level metadata, and column access."""

    path: Path
    columns: list[str]
    meta: dict[str, str]
    _table: Table | None = None  # astropy formats are read whole (they are small tables)

    @classmethod
    def open(cls, path: Path) -> "_TableFile":
        try:
            if path.suffix == ".parquet":
                schema = pq.read_schema(path)
                meta = {k.decode(errors="replace"): v.decode(errors="replace")
                        for k, v in (schema.metadata or {}).items()}
                return cls(path, list(schema.names), meta)
            fmt = "ascii.ecsv" if path.suffix == ".ecsv" else "fits"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # unit-parsing chatter; columns are checked below
                table = Table.read(path, format=fmt)
        except InputError:
            raise
        except Exception as exc:  # noqa: BLE001 - any reader failure is an input problem
            raise InputError(f"{path}: cannot be read as a table: {exc}") from exc
        meta = {str(k).lower(): str(v) for k, v in table.meta.items() if not isinstance(v, (dict, list))}
        return cls(path, list(table.colnames), meta, table)

    def missing(self, name: str, taken: tuple[str, ...] = ()) -> InputError:
        # Suggest from the columns that are not already some other required column, case first.
        spare = [c for c in self.columns if c not in taken]
        same_case = [c for c in spare if c.lower() == name.lower()]
        lowered = {c.lower(): c for c in spare}
        close = same_case or [lowered[c] for c in difflib.get_close_matches(name.lower(), list(lowered), n=1,
                                                                            cutoff=0.6)]
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return InputError(f"{self.path}: missing required column {name!r}{hint}; "
                          f"available columns: {self.columns}")

    def read(self, required: list[str], optional: list[str] = ()) -> dict[str, np.ndarray]:
        """Read `required` (InputError if absent or null) and the present `optional` columns."""
        for name in required:
            if name not in self.columns:
                raise self.missing(name, taken=tuple(required))
        names = [*required, *(n for n in optional if n in self.columns)]
        out: dict[str, np.ndarray] = {}
        if self._table is None:
            try:
                table = pq.read_table(self.path, columns=names)
            except Exception as exc:  # noqa: BLE001
                raise InputError(f"{self.path}: cannot read columns {names}: {exc}") from exc
            for name in names:
                col = table.column(name)
                if col.null_count and name in required:
                    raise InputError(f"{self.path}: required column {name!r} has {col.null_count} null value(s)")
                out[name] = self._convert(name, col.to_numpy(zero_copy_only=False))
        else:
            for name in names:
                col = self._table[name]
                if getattr(col, "mask", None) is not None and np.any(col.mask):
                    if name in required:
                        raise InputError(f"{self.path}: required column {name!r} has "
                                         f"{int(np.sum(col.mask))} masked value(s)")
                    col = col.filled(np.nan)
                out[name] = self._convert(name, np.asarray(col))
        return out

    def _convert(self, name: str, arr: np.ndarray) -> np.ndarray:
        if arr.ndim != 1:
            raise InputError(f"{self.path}: column {name!r} must be one value per row, got shape {arr.shape}")
        if name == "band":
            return np.asarray([v.decode() if isinstance(v, bytes) else str(v) for v in arr], dtype=str)
        dtype = np.int64 if name in _INT_COLUMNS else np.float64
        try:
            if dtype is np.int64 and arr.dtype.kind == "f":
                if not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)):
                    raise ValueError("non-integer values")
            return np.asarray(arr, dtype=dtype)
        except (TypeError, ValueError) as exc:
            raise InputError(f"{self.path}: column {name!r} cannot be read as {np.dtype(dtype).name}: {exc}") from exc


def _find_table(root: Path, stem: str, suffixes: tuple[str, ...], required: bool = True) -> _TableFile | None:
    """Locate ``<stem><suffix>``: exactly one must exist (ambiguity is an error, not a guess)."""
    found = [root / f"{stem}{s}" for s in suffixes if (root / f"{stem}{s}").is_file()]
    if len(found) > 1:
        raise InputError(f"{root}: ambiguous input, found {[p.name for p in found]}; keep only one")
    if not found:
        if required:
            raise InputError(f"{root}: missing required file {stem}{suffixes[0]} "
                             f"(also accepted: {', '.join(stem + s for s in suffixes[1:])})")
        return None
    return _TableFile.open(found[0])


def _require_finite(tf: _TableFile, cols: dict[str, np.ndarray], names) -> None:
    for name in names:
        arr = cols[name]
        if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
            rows = np.flatnonzero(~np.isfinite(arr))
            raise InputError(f"{tf.path}: required column {name!r} has {rows.size} NaN/non-finite "
                             f"value(s) (first rows: {rows[:5].tolist()})")


# --------------------------------------------------------------------------------------------
# The individual inputs.
# --------------------------------------------------------------------------------------------


def _read_sources(root: Path) -> SourceCatalog:
    tf = _find_table(root, "sources", (".parquet", ".fits"))
    cols = tf.read(list(_SOURCE_COLUMNS), ["source_id", "flags"])
    keep = None
    if "flags" in cols:
        keep = cols["flags"] == 0
        n_bad = int((~keep).sum())
        if n_bad:
            log.info("%s: dropped %d of %d detections with nonzero flags", tf.path, n_bad, keep.size)
        cols = {k: v[keep] for k, v in cols.items()}
    _require_finite(tf, cols, _SOURCE_COLUMNS)
    if cols["visit"].size == 0:
        raise InputError(f"{tf.path}: no usable detections" + (" (all flagged)" if keep is not None else ""))
    log.info("%s: read %d detections", tf.path, cols["visit"].size)
    try:
        return SourceCatalog(**{field: cols[name] for name, field in _SOURCE_COLUMNS.items()},
                             source_id=cols.get("source_id"))
    except InputError as exc:
        raise InputError(f"{tf.path}: {exc}") from exc


def _refcat_bands(tf: _TableFile) -> dict[str, str]:
    """band -> "flux" | "mag" from the ``<band>_flux`` / ``<band>_mag`` column names."""
    bands: dict[str, str] = {}
    for name in tf.columns:
        for kind in ("flux", "mag"):
            if name.endswith(f"_{kind}") and len(name) > len(kind) + 1:
                band = name[: -len(kind) - 1]
                if bands.get(band) == "flux":
                    log.info("%s: band %r has both flux and mag columns; using %s_flux", tf.path, band, band)
                    continue
                bands[band] = kind
    return bands


def _read_refcat(root: Path) -> ReferenceCatalog:
    tf = _find_table(root, "refcat", (".parquet", ".fits"))
    bands = _refcat_bands(tf)
    band_cols = [f"{b}_{k}{e}" for b, k in bands.items() for e in ("", "_err")]
    cols = tf.read([*_REFCAT_REQUIRED, *band_cols], list(_REFCAT_OPTIONAL))
    _require_finite(tf, cols, _REFCAT_REQUIRED)
    n = cols["ra"].size
    if "epoch" in cols:
        epoch = cols["epoch"]
        _require_finite(tf, cols, ["epoch"])
    else:
        value = tf.meta.get("epoch")
        if value is None:
            raise InputError(f"{tf.path}: no 'epoch' column and no file-level 'epoch' metadata key; "
                             "the epoch (decimal year) of ra/dec is required")
        try:
            epoch = np.full(n, float(value))
        except ValueError as exc:
            raise InputError(f"{tf.path}: file-level 'epoch' metadata {value!r} is not a number") from exc
    fluxes = {}
    for band, kind in bands.items():
        val, err = cols[f"{band}_{kind}"], cols[f"{band}_{kind}_err"]
        if kind == "mag":  # AB magnitudes -> nJy; errors propagated to first order
            flux = 10.0 ** (-0.4 * (val - AB_ZERO_POINT_NJY))
            val, err = flux, flux * (0.4 * np.log(10.0)) * err
        fluxes[band] = (val, err)
    try:
        return ReferenceCatalog(
            ref_id=cols.get("id", np.arange(n, dtype=np.int64)), ra=cols["ra"], dec=cols["dec"],
            ra_err=cols["ra_err"], dec_err=cols["dec_err"], epoch=epoch,
            pmra=cols.get("pmra"), pmdec=cols.get("pmdec"),
            pmra_err=cols.get("pmra_err"), pmdec_err=cols.get("pmdec_err"), fluxes=fluxes,
        )
    except InputError as exc:
        raise InputError(f"{tf.path}: {exc}") from exc


def _read_visits(root: Path) -> VisitTable:
    tf = _find_table(root, "visits", (".ecsv", ".parquet", ".fits"))
    cols = tf.read(list(_VISIT_REQUIRED), list(_VISIT_OPTIONAL))
    _require_finite(tf, cols, ["mjd"])
    try:
        return VisitTable(visit=cols["visit"], mjd=cols["mjd"], band=cols["band"],
                          exptime=cols.get("exptime"), airmass=cols.get("airmass"))
    except InputError as exc:
        raise InputError(f"{tf.path}: {exc}") from exc


def _read_camera(root: Path) -> Camera | None:
    tf = _find_table(root, "camera", (".ecsv", ".parquet", ".fits"), required=False)
    if tf is None:
        return None
    cols = tf.read(list(_CAMERA_REQUIRED))
    try:
        return Camera(**cols)
    except InputError as exc:
        raise InputError(f"{tf.path}: {exc}") from exc


_SIZE_KEYS = ("NAXIS1", "NAXIS2", "IMAGEW", "IMAGEH")


def _primary_header_text(path: Path) -> str | None:
    """The primary header of a FITS file as text, if it holds a WCS (CTYPE1); else None.

    Header-only WCS files (what jcal and most pipelines write) are read this way: astropy's
    WCS parses the text directly, ~1.5x faster than through `fits.open` (thousands of files)."""
    with open(path, "rb") as f:
        head = f.read(2880)
        if not head.startswith(b"SIMPLE  ="):
            return None
        blocks = [head]
        while not any(head[i:i + 8] == b"END     " for i in range(0, len(head), 80)):
            head = f.read(2880)
            if len(head) < 2880:
                return None
            blocks.append(head)
    text = b"".join(blocks).decode("ascii", errors="replace")
    cards = [text[i:i + 80] for i in range(0, len(text), 80)]
    end = next(i for i, c in enumerate(cards) if c.startswith("END     "))
    if not any(c.startswith("CTYPE1  =") for c in cards[:end]):
        return None
    return "".join(cards[: end + 1])


_SIP_CARD = re.compile(r"(A|B|AP|BP)_(ORDER|(\d+)_(\d+)) *= *([-+0-9.EeDd]+) *(/.*)?$")


def _split_sip(text: str) -> tuple[str, tuple] | None:
    """(header text without its SIP cards, (A, B, AP, BP) coefficient arrays) of a TAN-SIP header
    whose SIP cards are plain numbers, else None (astropy then parses the whole header)."""
    cards = [text[i:i + 80] for i in range(0, len(text), 80)]
    kept, orders, terms = [], {}, []
    for card in cards:
        key = card[:8].strip()
        if not key.startswith(("A_", "B_", "AP_", "BP_")) or key in ("A_DMAX", "B_DMAX"):
            kept.append(card)
            continue
        match = _SIP_CARD.match(card.rstrip())
        if match is None:
            return None
        name, value = match.group(1), float(match.group(5).replace("D", "E").replace("d", "e"))
        if match.group(2) == "ORDER":
            orders[name] = int(value)
        else:
            terms.append((name, int(match.group(3)), int(match.group(4)), value))
    if "A" not in orders or "B" not in orders or not any(c.startswith("CTYPE1  = 'RA---TAN-SIP") for c in kept):
        return None
    arrays = {name: np.zeros((order + 1, order + 1)) for name, order in orders.items()}
    for name, p, q, value in terms:
        if name not in arrays or p + q > orders[name]:
            return None
        arrays[name][p, q] = value
    return "".join(kept), (arrays["A"], arrays["B"], arrays.get("AP"), arrays.get("BP"))


def _read_wcs(path: Path, camera_size: dict[int, tuple[int, int]], detector: int) -> tuple[WCS, int, int]:
    """Celestial WCS and detector size (nx, ny) from one FITS file."""
    try:
        text = _primary_header_text(path)
        if text is not None:
            header = {c[:8].strip(): fits.Card.fromstring(c).value for c in
                      (text[i:i + 80] for i in range(0, len(text), 80)) if c[:8].strip() in _SIZE_KEYS}
        else:
            with fits.open(path, memmap=False, lazy_load_hdus=True) as hdus:
                headers = [h.header for h in hdus]
            # The WCS lives in the primary header, or in the first extension for image files.
            header = next((h for h in headers if "CTYPE1" in h), headers[0])
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"{path}: cannot be read as FITS: {exc}") from exc
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FITSFixedWarning)
            sip = None if text is None else _split_sip(text)
            if sip is not None:
                # SIP parsed here and the rest handed to wcslib directly: astropy's WCS(header)
                # re-parses the header card by card in Python (0.8 of 0.9 ms per file)
                text, coefficients = sip
                params = Wcsprm(header=text.encode("ascii"), relax=True)
                wcs = WCS(naxis=params.naxis)
                wcs.wcs = params
                wcs.fix()  # what WCS(header) does after parsing
                wcs.sip = Sip(*coefficients, params.crpix)
                wcs.wcs.set()
            else:
                wcs = WCS(header if text is None else text, relax=True)
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"{path}: not a valid FITS WCS: {exc}") from exc
    if not wcs.has_celestial:
        raise InputError(f"{path}: the WCS is not celestial (CTYPE = {list(wcs.wcs.ctype)}); "
                         "a sky (RA/Dec) WCS such as TAN, TAN-SIP or TPV is required")
    if wcs.naxis != 2:
        wcs = wcs.celestial
    # Detector size: NAXISn of an image header, else IMAGEW/IMAGEH of a data-less header
    # (a header-only FITS file may not carry NAXISn), else the camera table.
    nx, ny = header.get("NAXIS1"), header.get("NAXIS2")
    if not (nx and ny):
        nx, ny = header.get("IMAGEW"), header.get("IMAGEH")
    if not (nx and ny):
        if detector not in camera_size:
            raise InputError(f"{path}: no detector size (NAXIS1/NAXIS2 or IMAGEW/IMAGEH) and no "
                             f"camera.ecsv row for detector {detector}")
        nx, ny = camera_size[detector]
    if wcs.pixel_shape is None or 0 in wcs.pixel_shape:
        wcs.pixel_shape = (int(nx), int(ny))  # so that wcs.footprint & co. know the detector
    return wcs, int(nx), int(ny)


def read_input(path: str | os.PathLike) -> InputData:
    """Read a jcal input directory into an `InputData`.

    Files and columns (units):

    - ``sources.parquet``: ``visit, detector, x, y, xErr, yErr, instFlux, instFluxErr``
      (pixels, 0-based: (0, 0) is the centre of the first pixel; counts); optional
      ``source_id``, ``flags`` (nonzero rows are dropped, the count is logged on "jcal.io").
      Other columns are never read.
    - ``wcs/<visit>_<detector>.fits``: a celestial FITS WCS (TAN, TAN-SIP, TPV, ...; CRPIX is
      1-based as FITS says), one per detector-visit that has detections; the detector size
      comes from NAXIS1/NAXIS2 (or IMAGEW/IMAGEH), else from ``camera.ecsv``.
    - ``refcat.parquet``: ``ra, dec`` (deg), ``ra_err, dec_err`` (mas); optional ``pmra,
      pmdec`` (mas/yr), ``pmra_err, pmdec_err``, ``epoch`` (decimal year; else a file-level
      ``epoch`` metadata key is required), ``id``; per band ``<band>_flux, <band>_flux_err``
      (nJy) or ``<band>_mag, <band>_mag_err`` (AB, converted to nJy).
    - ``visits.ecsv`` (or ``.parquet``): ``visit, mjd, band``; optional ``exptime, airmass``.
    - optional ``camera.ecsv``: ``detector, focal_x, focal_y`` (mm), ``nx, ny``, ``pixel_scale``
      (arcsec/px).

    The tables may also be FITS binary tables (``.fits``). Raises `InputError` naming the file
    (and column) for a missing file or column, NaN in a required column, or a non-celestial WCS.
    """
    root = Path(path)
    if not root.is_dir():
        raise InputError(f"{root}: input directory does not exist")
    sources = _read_sources(root)
    refcat = _read_refcat(root)
    visits = _read_visits(root)
    camera = _read_camera(root)
    camera_size = {} if camera is None else {
        int(d): (int(nx), int(ny)) for d, nx, ny in zip(camera.detector, camera.nx, camera.ny)}

    wcs_dir = root / "wcs"
    if not wcs_dir.is_dir():
        raise InputError(f"{root}: missing required directory wcs/ (first-guess WCS per detector-visit)")
    ccd_visits: dict[tuple[int, int], CcdVisit] = {}
    pairs = np.stack([sources.visit, sources.detector], axis=1)
    for visit, detector in pairs[unique_rows(pairs)[0]].tolist():
        wcs_path = wcs_dir / wcs_filename(visit, detector)
        if not wcs_path.is_file():
            raise InputError(f"{wcs_path}: missing WCS file for (visit, detector) = ({visit}, {detector}), "
                             "which has detections in sources")
        wcs, nx, ny = _read_wcs(wcs_path, camera_size, detector)
        ccd_visits[(visit, detector)] = CcdVisit(visit=visit, detector=detector, wcs=wcs, nx=nx, ny=ny)
    log.info("%s: read %d detector-visit WCS files", root, len(ccd_visits))
    return InputData(sources=sources, ccd_visits=ccd_visits, refcat=refcat, visits=visits, camera=camera,
                     origin=str(root))


# --------------------------------------------------------------------------------------------
# Writing.
# --------------------------------------------------------------------------------------------


def _write_parquet(path: Path, columns: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    table = pa.table({k: pa.array(v) for k, v in columns.items()})
    if metadata:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
    pq.write_table(table, path)


def _wcs_header(wcs: WCS, nx: int, ny: int) -> fits.Header:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # to_header notes about SIP/relax
        header = wcs.to_header(relax=True)
    # A header-only primary HDU may not carry NAXISn (NAXIS = 0), so the detector size goes in
    # the astrometry.net keywords IMAGEW/IMAGEH, which read_input also understands.
    header["IMAGEW"] = (int(nx), "detector width, pixels")
    header["IMAGEH"] = (int(ny), "detector height, pixels")
    return header


def write_input_files(data: InputData, root: Path) -> None:
    """Write `data` in the input-directory format into the existing directory `root`.

    Not atomic by itself: use `write_input`, or call this inside `atomic_output_dir` when more
    files (e.g. a simulation's truth) go into the same directory.
    """
    root = Path(root)
    s = data.sources
    _write_parquet(root / "sources.parquet", {
        "visit": s.visit, "detector": s.detector, "x": s.x, "y": s.y, "xErr": s.x_err, "yErr": s.y_err,
        "instFlux": s.inst_flux, "instFluxErr": s.inst_flux_err, "source_id": s.source_id,
    })
    r = data.refcat
    ref_cols = {"id": r.ref_id, "ra": r.ra, "dec": r.dec, "ra_err": r.ra_err, "dec_err": r.dec_err,
                "epoch": r.epoch, "pmra": r.pmra, "pmdec": r.pmdec, "pmra_err": r.pmra_err,
                "pmdec_err": r.pmdec_err}
    for band, (flux, err) in r.fluxes.items():
        ref_cols[f"{band}_flux"], ref_cols[f"{band}_flux_err"] = np.asarray(flux), np.asarray(err)
    _write_parquet(root / "refcat.parquet", ref_cols)

    v = data.visits
    visits = Table({"visit": v.visit, "mjd": v.mjd, "band": v.band, "exptime": v.exptime, "airmass": v.airmass})
    visits["mjd"].unit, visits["exptime"].unit = "d", "s"
    visits.write(root / "visits.ecsv", format="ascii.ecsv")
    if data.camera is not None:
        c = data.camera
        camera = Table({"detector": c.detector, "focal_x": c.focal_x, "focal_y": c.focal_y,
                        "nx": c.nx, "ny": c.ny, "pixel_scale": c.pixel_scale})
        camera["focal_x"].unit = camera["focal_y"].unit = "mm"
        camera["pixel_scale"].unit = "arcsec / pix"
        camera.write(root / "camera.ecsv", format="ascii.ecsv")

    wcs_dir = root / "wcs"
    wcs_dir.mkdir()
    for (visit, detector), ccd in data.ccd_visits.items():
        # header-only file with NAXIS = 2 (no data): astropy opens it without a FITSFixedWarning
        header = _wcs_header(ccd.wcs, ccd.nx, ccd.ny)
        cards = [(c.keyword, c.value, c.comment) for c in header.cards]
        (wcs_dir / wcs_filename(visit, detector)).write_bytes(wcs_fits_bytes(cards))


def write_input(data: InputData, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write `data` as a jcal input directory at `path`, atomically (see `atomic_output_dir`).

    Returns the final path. `read_input(write_input(data, p))` reproduces `data`'s arrays
    exactly; WCS header values are written with FITS's ~16 significant digits.
    """
    path = Path(path)
    with atomic_output_dir(path, overwrite=overwrite) as tmp:
        write_input_files(data, tmp)
    return path

