"""Read LSST source tables (``sourceTable_visit`` / ``sourceTable`` parquet) and select sources.

What: `read_lsst_sources` reads only the columns jcal needs from one or more pandas-written
parquet tables, maps the column spellings of several pipeline generations onto one canonical
(current) spelling, splits visit-level tables into (visit, detector) pieces, applies a source
selection equivalent to jointcal's default source selector, and returns a `SourceCatalog` plus
per-detector selection counts.

Why: jointcal selects its measured stars with a configurable "science" source selector before
association. Reproducing that selection (and reporting how many rows each cut removed) lets a
jcal fit start from the same measurements as jointcal, and lets a user see at a glance why a
detector has few stars.

Column spellings. The canonical names are the current ``sourceTable_visit`` ones
(``dec``, ``ixx``, ``pixelFlags_edge``, ``apFlux_12_0_instFlux`` ...). Older tables use
capitalised functor names (``PixelFlags_edge``, ``ApFlux_12_0_instFlux``, ``Deblend_nChild``,
``HsmPsfMoments_flag``) which are matched case-insensitively, and some use different words
altogether (``decl`` for ``dec``, ``ccd`` for ``detector``, the pandas index ``id`` for
``sourceId``), which are listed in `COLUMN_ALIASES`. A column is looked up as: exact name, then
each alias, each compared case-insensitively. An exact-case match wins over a case-folded one.

Selection (jointcal's defaults, see `LsstSourceSelection`); a row is dropped by the first cut
it fails, in this order, and counted under that cut's name:

* ``flag:<name>`` -- any bad flag set (absent flag columns are skipped, with a log note);
* ``snr`` -- ``<flux>_instFlux / <flux>_instFluxErr`` not > ``min_snr`` (NaN fails);
* ``not_isolated`` -- ``parentSourceId != 0`` or ``deblend_nChild != 0``;
* ``nonfinite_radec`` -- non-finite ``ra`` or ``dec``;
* ``resolved`` -- (optional) extendedness not < ``unresolved_max``;
* ``not_primary`` -- (optional) ``detect_isPrimary`` false;
* ``bad_centroid_err`` -- ``xErr``/``yErr`` NaN or <= 0 (jointcal cannot weight such a
  measurement; the HSC sample has many of these);
* ``bad_measurement`` -- non-finite ``x``, ``y`` or instFlux, or instFluxErr <= 0
  (what is left of jcal's `SourceCatalog` validation after the cuts above).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from jcal.data import InputError, SourceCatalog, reading

log = logging.getLogger("jcal.io.lsst")

__all__ = [
    "COLUMN_ALIASES",
    "DEFAULT_BAD_FLAGS",
    "LsstSourceSelection",
    "SelectionCounts",
    "read_lsst_sources",
    "read_source_table",
    "resolve_columns",
    "select_sources",
]

# jointcal's default bad-flag list (python/lsst/jointcal/jointcal.py, JointcalConfig.setDefaults);
# "<flux>_flag" is appended for the chosen flux by `LsstSourceSelection.all_bad_flags`.
DEFAULT_BAD_FLAGS: tuple[str, ...] = (
    "pixelFlags_edge",
    "pixelFlags_saturated",
    "pixelFlags_interpolatedCenter",
    "pixelFlags_interpolated",
    "pixelFlags_crCenter",
    "pixelFlags_bad",
    "hsmPsfMoments_flag",
)

# Canonical (current) name -> other spellings seen in older or differently produced tables.
# Case differences (PixelFlags_* / ApFlux_* / Deblend_* / HsmPsfMoments_*) need no entry:
# every lookup is case-insensitive.
COLUMN_ALIASES: dict[str, tuple[str, ...]] = {
    "dec": ("decl",),  # pre-DM-31825 sourceTable_visit
    "detector": ("ccd",),  # legacy gen2 sourceTable_visit
    "sourceId": ("id",),  # pandas index column of older tables
    "ixx": ("Ixx",),
    "iyy": ("Iyy",),
    "ixy": ("Ixy",),
    "parentSourceId": ("parent",),
}


@dataclass(frozen=True)
class LsstSourceSelection:
    """Source cuts; the defaults reproduce jointcal's selector as run on cfht_minimal.

    jointcal's own default also applies an "unresolved" cut on ``sizeExtendedness`` < 0.5 and
    requires ``detect_isPrimary``; its cfht_minimal tests turn both off (those tables lack the
    columns), and so do these defaults. Set ``unresolved=True`` / ``require_primary=True`` to
    apply them; a requested cut whose column is missing raises `InputError`.
    """

    bad_flags: tuple[str, ...] = DEFAULT_BAD_FLAGS
    add_flux_flag: bool = True  # also reject "<flux_type>_flag", as jointcal does
    min_snr: float | None = 10.0  # strict: keep instFlux / instFluxErr > min_snr
    require_isolated: bool = True  # parentSourceId == 0 and deblend_nChild == 0
    require_finite_radec: bool = True
    unresolved: bool = False
    unresolved_columns: tuple[str, ...] = ("sizeExtendedness", "extendedness")  # first present wins
    unresolved_max: float = 0.5  # keep value < unresolved_max
    require_primary: bool = False
    primary_column: str = "detect_isPrimary"

    def all_bad_flags(self, flux_type: str) -> tuple[str, ...]:
        flags = tuple(self.bad_flags)
        if self.add_flux_flag and f"{flux_type}_flag" not in flags:
            flags = flags + (f"{flux_type}_flag",)
        return flags


NO_SELECTION = LsstSourceSelection(
    bad_flags=(), add_flux_flag=False, min_snr=None, require_isolated=False,
    require_finite_radec=False, unresolved=False, require_primary=False,
)


@dataclass
class SelectionCounts:
    """How many rows each cut removed, per (visit, detector).

    ``per_ccd[(visit, detector)]`` maps ``"read"``, each drop reason (see the module
    docstring) and ``"kept"`` to a row count; ``read == kept + sum(drops)`` always holds.
    ``skipped_flags`` lists requested bad-flag columns that were absent from some table.
    """

    per_ccd: dict[tuple[int, int], dict[str, int]] = field(default_factory=dict)
    skipped_flags: set[str] = field(default_factory=set)

    def add(self, key: tuple[int, int], reason: str, n: int) -> None:
        d = self.per_ccd.setdefault(key, {"read": 0, "kept": 0})
        d[reason] = d.get(reason, 0) + int(n)

    def total(self, reason: str) -> int:
        """Rows counted under `reason` ("read", "kept" or a drop reason) over all ccd-visits."""
        return sum(d.get(reason, 0) for d in self.per_ccd.values())

    def kept(self, visit: int, detector: int) -> int:
        return self.per_ccd.get((visit, detector), {}).get("kept", 0)

    def drops(self, visit: int | None = None, detector: int | None = None) -> dict[str, int]:
        """Drop reasons -> counts, for one ccd-visit or (default) summed over all."""
        out: dict[str, int] = {}
        for (v, d), counts in self.per_ccd.items():
            if (visit is not None and v != visit) or (detector is not None and d != detector):
                continue
            for reason, n in counts.items():
                if reason not in ("read", "kept") and n:
                    out[reason] = out.get(reason, 0) + n
        return out

    def merge(self, other: "SelectionCounts") -> None:
        for key, counts in other.per_ccd.items():
            for reason, n in counts.items():
                self.add(key, reason, n)
        self.skipped_flags |= other.skipped_flags


# --------------------------------------------------------------------------------------------
# Column resolution
# --------------------------------------------------------------------------------------------

def _find_column(available: Iterable[str], name: str) -> str | None:
    """The file's spelling of canonical column `name`, or None (exact > alias > case-folded)."""
    available = list(available)
    candidates = (name, *COLUMN_ALIASES.get(name, ()))
    for cand in candidates:
        if cand in available:
            return cand
    folded: dict[str, list[str]] = {}
    for col in available:
        folded.setdefault(col.lower(), []).append(col)
    for cand in candidates:
        hits = folded.get(cand.lower(), [])
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise InputError(f"column {name!r} is ambiguous: the table has {sorted(hits)}")
    return None


def resolve_columns(available: Iterable[str], required: Iterable[str], optional: Iterable[str] = (),
                    *, source: str = "table") -> dict[str, str]:
    """Map canonical column names to the table's spelling.

    Raises `InputError` naming the first missing required column (and the file); optional
    columns that are absent are left out of the result.
    """
    available = list(available)
    out: dict[str, str] = {}
    for name in required:
        col = _find_column(available, name)
        if col is None:
            aliases = COLUMN_ALIASES.get(name, ())
            also = f" (or {', '.join(repr(a) for a in aliases)})" if aliases else ""
            raise InputError(f"{source}: required column {name!r}{also} is missing")
        out[name] = col
    for name in optional:
        col = _find_column(available, name)
        if col is not None:
            out[name] = col
    return out


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------

def _to_numpy(col: pa.ChunkedArray, dtype, name: str = "?") -> np.ndarray:
    """Arrow column -> numpy, with nulls as NaN (floats) or False (bools)."""
    if col.null_count:
        if np.dtype(dtype) == np.bool_:
            col = col.fill_null(False)
        elif np.dtype(dtype).kind == "f":
            col = col.cast(pa.float64()).fill_null(float("nan"))
        else:
            raise InputError(f"column {name!r} has {col.null_count} null value(s) in an integer column")
    return np.asarray(col.to_numpy(zero_copy_only=False), dtype=dtype)


def read_source_table(path: str | os.PathLike | pa.Table, flux_type: str = "apFlux_12_0",
                      selection: LsstSourceSelection | None = None) -> tuple[dict[str, np.ndarray], list[str]]:
    """Read the columns needed for `selection` from one parquet table, canonically named.

    `path` may also be an in-memory ``pyarrow.Table`` (e.g. from a data butler); it then needs
    ``visit`` and ``detector`` columns.

    Returns ``(columns, skipped_flags)``: a dict canonical name -> numpy array (flag columns
    under their canonical flag name) and the requested bad flags absent from the file.
    ``visit`` may be absent from a per-detector table only if the file name says
    ``<visit>_<detector>.parquet``; ``detector`` likewise.
    """
    sel = selection or NO_SELECTION
    in_memory = path if isinstance(path, pa.Table) else None
    if in_memory is not None:
        names, path = list(in_memory.schema.names), Path("<in-memory table>")
    else:
        path = Path(path)
        try:
            names = list(pq.read_schema(path).names)
        except Exception as exc:  # pyarrow raises several types for unreadable files
            raise InputError(f"{path}: cannot read as parquet: {exc}") from exc
    src = str(path)

    flux = f"{flux_type}_instFlux"
    flux_err = f"{flux_type}_instFluxErr"
    required = ["x", "y", "xErr", "yErr", flux, flux_err]
    optional = ["visit", "detector", "sourceId"]
    if sel.require_isolated:
        required += ["parentSourceId", "deblend_nChild"]
    if sel.require_finite_radec:
        required += ["ra", "dec"]
    if sel.require_primary:
        required.append(sel.primary_column)
    mapping = resolve_columns(names, required, optional, source=src)

    if sel.unresolved:
        for cand in sel.unresolved_columns:
            col = _find_column(names, cand)
            if col is not None:
                mapping["_unresolved"] = col
                break
        else:
            raise InputError(f"{src}: unresolved cut requested but none of the columns "
                             f"{list(sel.unresolved_columns)} is present")

    skipped: list[str] = []
    flag_cols: dict[str, str] = {}
    for flag in sel.all_bad_flags(flux_type):
        col = _find_column(names, flag)
        if col is None:
            skipped.append(flag)
        else:
            flag_cols[flag] = col

    wanted = sorted(set(mapping.values()) | set(flag_cols.values()))
    with reading(path, "parquet source table"):
        table = in_memory.select(wanted) if in_memory is not None else pq.read_table(path, columns=wanted)
    n = table.num_rows

    out: dict[str, np.ndarray] = {}
    for canon, col in mapping.items():
        arr = table.column(col)
        if canon in ("visit", "detector", "sourceId", "parentSourceId", "deblend_nChild"):
            out[canon] = _to_numpy(arr, np.int64, f"{src}:{col}")
        elif canon == sel.primary_column:
            out[canon] = _to_numpy(arr, np.bool_, f"{src}:{col}")
        else:
            out[canon] = _to_numpy(arr, np.float64, f"{src}:{col}")
    for flag, col in flag_cols.items():
        out["flag:" + flag] = _to_numpy(table.column(col), np.bool_, f"{src}:{col}")

    # Per-detector tables may carry visit/detector only in the file name (<visit>_<det>.parquet).
    if "visit" not in out or "detector" not in out:
        stem = path.stem.split("_")
        if len(stem) >= 2 and stem[0].isdigit() and stem[1].isdigit():
            out.setdefault("visit", np.full(n, int(stem[0]), dtype=np.int64))
            out.setdefault("detector", np.full(n, int(stem[1]), dtype=np.int64))
        else:
            missing = "visit" if "visit" not in out else "detector"
            raise InputError(f"{src}: required column {missing!r} is missing "
                             f"(and the file name is not <visit>_<detector>.parquet)")
    return out, skipped


# --------------------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------------------

def select_sources(cols: Mapping[str, np.ndarray], flux_type: str, selection: LsstSourceSelection,
                   counts: SelectionCounts) -> np.ndarray:
    """Boolean mask of kept rows; every drop is attributed to its first failing cut in `counts`."""
    visit, det = cols["visit"], cols["detector"]
    n = visit.shape[0]
    keep = np.ones(n, dtype=bool)
    keys = np.stack([visit, det], axis=1)
    uniq, inverse = np.unique(keys, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    ukeys = [(int(v), int(d)) for v, d in uniq]
    for key, n_read in zip(ukeys, np.bincount(inverse, minlength=len(ukeys))):
        counts.add(key, "read", int(n_read))

    def cut(reason: str, bad: np.ndarray) -> None:
        drop = keep & bad
        if drop.any():
            per = np.bincount(inverse[drop], minlength=len(ukeys))
            for i in np.flatnonzero(per):
                counts.add(ukeys[i], reason, int(per[i]))
        keep[drop] = False

    with np.errstate(divide="ignore", invalid="ignore"):
        for flag in selection.all_bad_flags(flux_type):
            col = cols.get("flag:" + flag)
            if col is not None:
                cut("flag:" + flag, col)
        f, fe = cols[f"{flux_type}_instFlux"], cols[f"{flux_type}_instFluxErr"]
        if selection.min_snr is not None:
            cut("snr", ~(f / fe > selection.min_snr))
        if selection.require_isolated:
            cut("not_isolated", (cols["parentSourceId"] != 0) | (cols["deblend_nChild"] != 0))
        if selection.require_finite_radec:
            cut("nonfinite_radec", ~(np.isfinite(cols["ra"]) & np.isfinite(cols["dec"])))
        if selection.unresolved:
            cut("resolved", ~(cols["_unresolved"] < selection.unresolved_max))
        if selection.require_primary:
            cut("not_primary", ~cols[selection.primary_column])
        xe, ye = cols["xErr"], cols["yErr"]
        cut("bad_centroid_err", ~((xe > 0) & (ye > 0) & np.isfinite(xe) & np.isfinite(ye)))
        cut("bad_measurement", ~(np.isfinite(cols["x"]) & np.isfinite(cols["y"]) & np.isfinite(f)
                                 & np.isfinite(fe) & (fe > 0)))

    kept = np.bincount(inverse[keep], minlength=len(ukeys))
    for i, key in enumerate(ukeys):
        counts.add(key, "kept", int(kept[i]))
    return keep


def _source_paths(paths_or_dir) -> list[Path | pa.Table]:
    if isinstance(paths_or_dir, pa.Table):
        return [paths_or_dir]
    if isinstance(paths_or_dir, (str, os.PathLike)):
        p = Path(paths_or_dir)
        if p.is_dir():
            files = sorted(q for q in p.iterdir() if q.suffix in (".parquet", ".parq") and q.is_file())
            if not files:
                raise InputError(f"{p}: no .parquet/.parq source tables in this folder")
            return files
        if not p.exists():
            raise InputError(f"{p}: source table not found")
        return [p]
    files = [p if isinstance(p, pa.Table) else Path(p) for p in paths_or_dir]
    if not files:
        raise InputError("no source tables given")
    for p in files:
        if isinstance(p, Path) and not p.exists():
            raise InputError(f"{p}: source table not found")
    return files


def read_lsst_sources(paths_or_dir, flux_type: str = "apFlux_12_0",
                      selection: LsstSourceSelection | None = LsstSourceSelection(),
                      ) -> tuple[SourceCatalog, SelectionCounts]:
    """Read and select LSST source tables into one `SourceCatalog`.

    Parameters
    ----------
    paths_or_dir
        A parquet file, a folder of them, or an iterable of paths or in-memory
        ``pyarrow.Table`` objects (as a data butler returns them). Each table is a
        ``sourceTable_visit`` (many detectors; split on the ``detector``/``ccd`` column) or a
        per-detector ``sourceTable``.
    flux_type
        Flux prefix: ``<flux_type>_instFlux(Err)`` (counts) is read and cut on S/N, as jointcal's
        ``sourceFluxType`` (default ``apFlux_12_0``, jointcal's default).
    selection
        The cuts (`LsstSourceSelection`); ``None`` applies none except the validity cuts
        (``bad_centroid_err``, ``bad_measurement``) that jcal's `SourceCatalog` needs.

    Returns
    -------
    (SourceCatalog, SelectionCounts)
        Rows sorted by (visit, detector), original order within; ``source_id`` from the
        table's ``sourceId`` (or its index column ``id``) when present.
    """
    sel = selection if selection is not None else NO_SELECTION
    counts = SelectionCounts()
    pieces: list[dict[str, np.ndarray]] = []
    for path in _source_paths(paths_or_dir):
        cols, skipped = read_source_table(path, flux_type, sel)
        path = path if isinstance(path, Path) else Path("<in-memory table>")
        for flag in skipped:
            log.info("%s: bad-flag column %r absent; that cut is skipped", path.name, flag)
        counts.skipped_flags |= set(skipped)
        file_counts = SelectionCounts()
        keep = select_sources(cols, flux_type, sel, file_counts)
        counts.merge(file_counts)
        for key in sorted(file_counts.per_ccd):
            c = file_counts.per_ccd[key]
            drops = {k: v for k, v in c.items() if k not in ("read", "kept") and v}
            log.info("%s visit %d detector %d: %d read, %d kept; dropped %s",
                     path.name, key[0], key[1], c["read"], c["kept"], drops or "none")
        piece = {k: v[keep] for k, v in cols.items()}
        if "sourceId" not in piece:
            piece["sourceId"] = None
        pieces.append(piece)

    def cat(name):
        return np.concatenate([p[name] for p in pieces])

    visit, det = cat("visit"), cat("detector")
    order = np.lexsort((np.arange(visit.shape[0]), det, visit))  # stable by (visit, detector)
    have_ids = all(p["sourceId"] is not None for p in pieces)
    sources = SourceCatalog(
        visit=visit[order], detector=det[order],
        x=cat("x")[order], y=cat("y")[order],
        x_err=cat("xErr")[order], y_err=cat("yErr")[order],
        inst_flux=cat(f"{flux_type}_instFlux")[order],
        inst_flux_err=cat(f"{flux_type}_instFluxErr")[order],
        source_id=cat("sourceId")[order] if have_ids else None,
    )
    log.info("sources: %d read, %d kept in %d ccd-visit(s); drops %s",
             counts.total("read"), counts.total("kept"), len(counts.per_ccd), counts.drops())
    return sources, counts
