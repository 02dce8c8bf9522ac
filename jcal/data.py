"""jcal's input data model: what a fit consumes, in host memory (numpy + astropy).

Every reader (jcal's own directory format, LSST outputs, the simulator) produces an
`InputData`; every fit consumes one. Arrays are plain numpy, one row per item; the
constructors validate shapes and finiteness so that bad input fails here, loudly and by
name, rather than deep inside a compiled solver.

Units follow the input format: pixels are 0-based ((0, 0) is the centre of the first
pixel), sky positions in degrees, reference position errors in mas, proper motions in
mas/yr, epochs in decimal (Julian) years, calibrated fluxes in nJy, instrumental fluxes in
counts.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field

import numpy as np
from astropy.wcs import WCS


class InputError(ValueError):
    """Input data that jcal cannot fit; the message names the file/column/row at fault."""


@contextlib.contextmanager
def reading(path, what: str = "file"):
    """Inside the block, any failure reading `path` (corrupt, truncated, unexpected types) becomes
    an InputError naming the file, so a bad file never surfaces as a library's internal error."""
    try:
        yield
    except (InputError, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - whatever a reader raises on a bad file
        raise InputError(f"{path}: cannot read this {what}: {type(exc).__name__}: {exc}") from exc


def _as_array(name: str, values, dtype, n: int | None) -> np.ndarray:
    try:
        arr = np.asarray(values, dtype=dtype)
    except (TypeError, ValueError) as exc:
        raise InputError(f"column {name!r} cannot be read as {np.dtype(dtype).name}: {exc}") from exc
    if arr.ndim != 1:
        raise InputError(f"column {name!r} must be one-dimensional, got shape {arr.shape}")
    if n is not None and arr.shape[0] != n:
        raise InputError(f"column {name!r} has {arr.shape[0]} rows, expected {n}")
    return arr


def _require_finite(owner: str, name: str, arr: np.ndarray) -> None:
    bad = ~np.isfinite(arr)
    if bad.any():
        rows = np.flatnonzero(bad)
        raise InputError(
            f"{owner}: column {name!r} has {bad.sum()} non-finite value(s) (first rows: {rows[:5].tolist()})"
        )


def _validated(obj, owner: str, ints=(), floats=(), finite=(), positive=()):
    """Coerce dataclass fields to 1-d arrays of a common length and check them."""
    n = None
    for name in (*ints, *floats):
        value = getattr(obj, name)
        if value is None:
            continue
        arr = _as_array(f"{owner}.{name}", value, np.int64 if name in ints else np.float64, n)
        n = arr.shape[0] if n is None else n
        object.__setattr__(obj, name, arr)
    for name in finite:
        _require_finite(owner, name, getattr(obj, name))
    for name in positive:
        arr = getattr(obj, name)
        if np.any(arr <= 0):
            raise InputError(f"{owner}: column {name!r} must be > 0 (first bad rows: "
                             f"{np.flatnonzero(arr <= 0)[:5].tolist()})")
    return n or 0


@dataclass(frozen=True)
class SourceCatalog:
    """Detections ("measured stars" in jointcal): one row per source on one detector-visit."""

    visit: np.ndarray  # int64 (n,)
    detector: np.ndarray  # int64 (n,)
    x: np.ndarray  # float64 (n,) pixels, 0-based
    y: np.ndarray
    x_err: np.ndarray  # float64 (n,) pixels, 1 sigma
    y_err: np.ndarray
    inst_flux: np.ndarray  # float64 (n,) counts
    inst_flux_err: np.ndarray
    source_id: np.ndarray | None = None  # int64 (n,); defaults to the row number

    def __post_init__(self):
        n = _validated(
            self, "sources",
            ints=("visit", "detector", "source_id"),
            floats=("x", "y", "x_err", "y_err", "inst_flux", "inst_flux_err"),
            finite=("x", "y", "x_err", "y_err", "inst_flux", "inst_flux_err"),
            positive=("x_err", "y_err", "inst_flux_err"),
        )
        if self.source_id is None:
            object.__setattr__(self, "source_id", np.arange(n, dtype=np.int64))

    def __len__(self) -> int:
        return self.x.shape[0]

    def take(self, rows: np.ndarray) -> "SourceCatalog":
        return SourceCatalog(**{f.name: getattr(self, f.name)[rows] for f in dataclasses.fields(self)})


@dataclass(frozen=True)
class ReferenceCatalog:
    """Reference stars (Gaia-like). Optional columns are all-NaN when absent."""

    ref_id: np.ndarray  # int64 (r,)
    ra: np.ndarray  # float64 (r,) deg, at `epoch`
    dec: np.ndarray
    ra_err: np.ndarray  # float64 (r,) mas (on the sky, i.e. already times cos dec)
    dec_err: np.ndarray
    epoch: np.ndarray  # float64 (r,) decimal year of ra/dec
    pmra: np.ndarray | None = None  # mas/yr (mu_alpha * cos dec)
    pmdec: np.ndarray | None = None
    pmra_err: np.ndarray | None = None
    pmdec_err: np.ndarray | None = None
    fluxes: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # band -> (nJy, nJy err)

    def __post_init__(self):
        n = _validated(
            self, "refcat",
            ints=("ref_id",),
            floats=("ra", "dec", "ra_err", "dec_err", "epoch", "pmra", "pmdec", "pmra_err", "pmdec_err"),
            finite=("ra", "dec", "ra_err", "dec_err", "epoch"),
            positive=("ra_err", "dec_err"),
        )
        for name in ("pmra", "pmdec", "pmra_err", "pmdec_err"):
            if getattr(self, name) is None:
                object.__setattr__(self, name, np.full(n, np.nan))
        for band, (flux, err) in self.fluxes.items():
            _as_array(f"refcat.{band}_flux", flux, np.float64, n)
            _as_array(f"refcat.{band}_flux_err", err, np.float64, n)
        if np.any(np.abs(self.dec) > 90):
            raise InputError("refcat: column 'dec' has values outside [-90, 90] deg")

    def __len__(self) -> int:
        return self.ra.shape[0]

    @property
    def has_proper_motion(self) -> np.ndarray:
        """(r,) bool: rows with a usable proper motion and its errors."""
        return (np.isfinite(self.pmra) & np.isfinite(self.pmdec)
                & np.isfinite(self.pmra_err) & np.isfinite(self.pmdec_err))

    def take(self, rows: np.ndarray) -> "ReferenceCatalog":
        kw = {f.name: getattr(self, f.name)[rows] for f in dataclasses.fields(self) if f.name != "fluxes"}
        kw["fluxes"] = {b: (f[rows], e[rows]) for b, (f, e) in self.fluxes.items()}
        return ReferenceCatalog(**kw)


@dataclass(frozen=True)
class VisitTable:
    """One row per visit: when, in which band, and optional exposure conditions."""

    visit: np.ndarray  # int64 (v,)
    mjd: np.ndarray  # float64 (v,) mid-exposure MJD (TAI)
    band: np.ndarray  # str (v,)
    exptime: np.ndarray | None = None  # float64 (v,) s
    airmass: np.ndarray | None = None

    def __post_init__(self):
        n = _validated(self, "visits", ints=("visit",), floats=("mjd", "exptime", "airmass"), finite=("mjd",))
        object.__setattr__(self, "band", np.asarray(self.band, dtype=str))
        if self.band.shape != (n,):
            raise InputError(f"visits: column 'band' has shape {self.band.shape}, expected ({n},)")
        if len(np.unique(self.visit)) != n:
            raise InputError("visits: column 'visit' has duplicate values")
        for name in ("exptime", "airmass"):
            if getattr(self, name) is None:
                object.__setattr__(self, name, np.full(n, np.nan))

    def __len__(self) -> int:
        return self.visit.shape[0]

    @property
    def epoch(self) -> np.ndarray:
        """(v,) decimal Julian year of each visit."""
        return 2000.0 + (self.mjd - 51544.5) / 365.25


@dataclass(frozen=True)
class Camera:
    """Optional nominal camera geometry, one row per detector."""

    detector: np.ndarray  # int64 (d,)
    focal_x: np.ndarray  # float64 (d,) nominal focal-plane centre, mm
    focal_y: np.ndarray
    nx: np.ndarray  # int64 (d,) detector size in pixels
    ny: np.ndarray
    pixel_scale: np.ndarray  # float64 (d,) arcsec / pixel

    def __post_init__(self):
        _validated(self, "camera", ints=("detector", "nx", "ny"),
                   floats=("focal_x", "focal_y", "pixel_scale"),
                   finite=("focal_x", "focal_y", "pixel_scale"), positive=("nx", "ny", "pixel_scale"))


@dataclass(frozen=True)
class CcdVisit:
    """One detector in one visit: its first-guess WCS and pixel bounding box."""

    visit: int
    detector: int
    wcs: WCS  # celestial; evaluate with origin=0 (jcal pixels are 0-based)
    nx: int  # pixels: x in [-0.5, nx - 0.5]
    ny: int


@dataclass(frozen=True)
class InputData:
    """Everything a fit reads. Construct through a reader or the simulator."""

    sources: SourceCatalog
    ccd_visits: dict[tuple[int, int], CcdVisit]  # (visit, detector) -> CcdVisit
    refcat: ReferenceCatalog
    visits: VisitTable
    camera: Camera | None = None
    origin: str | None = None  # the folder it was read from (an output never replaces it)

    def __post_init__(self):
        if len(self.sources) == 0:
            raise InputError("sources: the catalog is empty")
        if len(self.refcat) == 0:
            raise InputError("refcat: the reference catalog is empty")
        known_visits = set(self.visits.visit.tolist())
        source_visits = set(np.unique(self.sources.visit).tolist())
        missing = sorted(source_visits - known_visits)
        if missing:
            raise InputError(f"visits: no row for visit(s) {missing[:10]} that appear in sources")
        pairs = np.unique(np.stack([self.sources.visit, self.sources.detector], axis=1), axis=0)
        no_wcs = [tuple(p) for p in pairs.tolist() if tuple(p) not in self.ccd_visits]
        if no_wcs:
            raise InputError(
                f"wcs: {len(no_wcs)} detector-visit(s) with detections have no first-guess WCS, "
                f"e.g. (visit, detector) = {no_wcs[:5]}"
            )

    @property
    def visit_ids(self) -> np.ndarray:
        """Sorted visits that have detections."""
        return np.unique(self.sources.visit)

    @property
    def detector_ids(self) -> np.ndarray:
        """Sorted detectors that have detections."""
        return np.unique(self.sources.detector)
