"""LSST HTM-sharded reference catalogs, HTM indexing, and jointcal's bounding circle.

What:

* `htm_index` -- vectorised Hierarchical Triangular Mesh ids (the scheme LSST's
  ``sphgeom.HtmPixelization`` uses): 8 root triangles S0..S3, N0..N3 with ids 8..15, each
  subdivided 4-way per level (child k of t has id 4 t + k), so a depth-d id lies in
  [8 * 4^d, 16 * 4^d).
* `htm_trixels_in_circle` -- the depth-d trixels that may overlap a sky circle.
* `read_lsst_refcat` -- the rows of an LSST refcat folder (``config.py`` + ``<htm id>.fits``
  shards, afw SimpleCatalogs) that fall inside a sky circle, as a `jcal.data.ReferenceCatalog`
  plus the refcat's flag bits (e.g. ``resolved``).
* `bounding_circle` -- the circle jointcal loads its reference stars in (see its docstring).

Shard selection: the folder's shard files are named by their trixel id. We compute, by a
descent of the HTM tree with conservative bounding-circle tests, every depth-d trixel that may
overlap the requested circle, read the shard files among those ids, then keep only rows inside
the circle. A shard that does not actually touch the circle may be read (harmless: its rows are
cut); a shard that does is never missed. A trixel overlapping the circle with no file is normal
for sparse refcats and only logged; if *no* overlapping trixel has a file, or no row falls in the
circle, `InputError` says the refcat does not cover the field.

``config.py`` is never executed: it is parsed with `ast` and only literal right-hand sides of
``config.<...> = <literal>`` assignments are read (`read_refcat_config`).

Units and conventions of the returned `ReferenceCatalog`: ra/dec degrees (the shards hold
radians); ra_err/dec_err mas on the sky (LSST refcats store ``coord_raErr``/``coord_decErr`` in
radians; as for Gaia, from which they are usually built, the RA error is taken to be the on-sky
one, i.e. already times cos dec); proper motions mas/yr (``pm_ra`` is mu_alpha cos dec, stored
in rad/yr), NaN when the refcat has none; epoch from the ``epoch`` column (MJD(TAI)) converted to
a decimal year, or 2000.0 when the refcat has no epoch column (true of SDSS- or PS1-based
refcats, whose positions are not epoch-propagated anyway); fluxes nJy (format_version >= 1 and
``TUNIT = 'nJy'``; version-0 catalogs in Jy are scaled by 1e9).

Coordinate errors, as jointcal does it: a configured ``reference_error_mas`` overrides the
catalog's errors (jointcal: ``astrometryReferenceErr``, logged as an override when the catalog has
errors); without it the catalog must have ``coord_raErr``/``coord_decErr`` or `InputError` is
raised, as jointcal raises a config validation error.
"""

from __future__ import annotations

import ast
import contextlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from astropy.io import fits

from jcal.data import InputError, ReferenceCatalog, reading
from jcal_models import sky_to_tangent, tangent_to_sky

log = logging.getLogger("jcal.io.lsst")

__all__ = [
    "LsstRefcat",
    "RefcatShards",
    "bounding_circle",
    "htm_index",
    "htm_trixel_vertices",
    "htm_trixels_in_circle",
    "read_lsst_refcat",
    "read_refcat_config",
]

# --------------------------------------------------------------------------------------------
# Vectors
# --------------------------------------------------------------------------------------------


def unit_vector(ra_deg, dec_deg) -> np.ndarray:
    """(..., 3) unit vectors of sky positions in degrees."""
    ra, dec = np.radians(ra_deg), np.radians(dec_deg)
    return np.stack([np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)], axis=-1)


def to_radec(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sky position in degrees (ra in [0, 360)) of (..., 3) vectors (normalised here)."""
    v = v / np.linalg.norm(v, axis=-1, keepdims=True)
    return (np.degrees(np.arctan2(v[..., 1], v[..., 0])) % 360.0,
            np.degrees(np.arcsin(np.clip(v[..., 2], -1.0, 1.0))))


def _normalize(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _angle_deg(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Angle between unit vectors, accurate at small angles (chord formula)."""
    return np.degrees(2 * np.arcsin(np.clip(np.linalg.norm(u - v, axis=-1) / 2, 0, 1)))


# --------------------------------------------------------------------------------------------
# HTM
# --------------------------------------------------------------------------------------------

_HTM_V = np.array([[0, 0, 1], [1, 0, 0], [0, 1, 0], [-1, 0, 0], [0, -1, 0], [0, 0, -1]], dtype=float)
# Root trixels (id, vertex indices), each counter-clockwise seen from outside the sphere.
_HTM_ROOTS = (
    (8, (1, 5, 2)), (9, (2, 5, 3)), (10, (3, 5, 4)), (11, (4, 5, 1)),  # S0..S3
    (12, (1, 0, 4)), (13, (4, 0, 3)), (14, (3, 0, 2)), (15, (2, 0, 1)),  # N0..N3
)


def _dot(a, b):
    return np.einsum("...i,...i->...", a, b)


def _children(v0, v1, v2):
    """The 4 children (vertex triples) of trixels (v0, v1, v2), in HTM child order 0..3."""
    w0 = _normalize(v1 + v2)
    w1 = _normalize(v0 + v2)
    w2 = _normalize(v0 + v1)
    return ((v0, w2, w1), (v1, w0, w2), (v2, w1, w0), (w0, w1, w2))


def htm_index(ra_deg, dec_deg, depth: int = 7) -> np.ndarray:
    """HTM trixel ids (int64) at `depth` of sky positions in degrees (vectorised)."""
    p = np.atleast_2d(unit_vector(np.asarray(ra_deg, float), np.asarray(dec_deg, float)).reshape(-1, 3))
    n = p.shape[0]
    ids = np.full(n, -1, dtype=np.int64)
    v0 = np.empty((n, 3)); v1 = np.empty((n, 3)); v2 = np.empty((n, 3))
    for rid, (a, b, c) in _HTM_ROOTS:
        va, vb, vc = _HTM_V[a], _HTM_V[b], _HTM_V[c]
        inside = ((p @ np.cross(va, vb) >= 0) & (p @ np.cross(vb, vc) >= 0)
                  & (p @ np.cross(vc, va) >= 0) & (ids < 0))
        ids[inside] = rid
        v0[inside], v1[inside], v2[inside] = va, vb, vc
    if np.any(ids < 0):  # cannot happen for finite input; guards against NaN
        raise InputError("htm_index: non-finite sky position(s)")
    for _ in range(depth):
        w0, w1, w2 = _normalize(v1 + v2), _normalize(v0 + v2), _normalize(v0 + v1)
        # Outside the central child (w0, w1, w2) across the edge facing corner k -> child k.
        k = np.full(n, 3, dtype=np.int64)
        c2 = _dot(np.cross(w0, w1), p) < 0
        c1 = _dot(np.cross(w2, w0), p) < 0
        c0 = _dot(np.cross(w1, w2), p) < 0
        k[c2] = 2
        k[c1] = 1
        k[c0] = 0
        nv0 = np.where((k == 0)[:, None], v0, np.where((k == 1)[:, None], v1, np.where((k == 2)[:, None], v2, w0)))
        nv1 = np.where((k == 0)[:, None], w2, np.where((k == 1)[:, None], w0, np.where((k == 2)[:, None], w1, w1)))
        nv2 = np.where((k == 0)[:, None], w1, np.where((k == 1)[:, None], w2, np.where((k == 2)[:, None], w0, w2)))
        v0, v1, v2 = nv0, nv1, nv2
        ids = 4 * ids + k
    return ids.reshape(np.shape(np.asarray(ra_deg)))


def htm_depth_of(trixel_id: int) -> int:
    """Depth of an HTM id (ids at depth d are in [8 * 4^d, 16 * 4^d))."""
    if trixel_id < 8:
        raise ValueError(f"{trixel_id} is not an HTM id")
    return (int(trixel_id).bit_length() - 4) // 2


def htm_trixel_vertices(ids) -> np.ndarray:
    """(n, 3, 3) vertex unit vectors of HTM trixels (any depths)."""
    ids = np.atleast_1d(np.asarray(ids, dtype=np.int64))
    out = np.empty((ids.size, 3, 3))
    for i, tid in enumerate(ids.tolist()):
        depth = htm_depth_of(tid)
        root = tid >> (2 * depth)
        a, b, c = dict(_HTM_ROOTS)[root]
        v = (_HTM_V[a], _HTM_V[b], _HTM_V[c])
        for level in range(depth - 1, -1, -1):
            v = _children(*v)[(tid >> (2 * level)) & 3]
        out[i] = np.stack(v)
    return out


def _bounding_caps(v0, v1, v2):
    """Centre and angular radius (deg) of a cap containing each trixel (vertex-centroid cap)."""
    c = _normalize(v0 + v1 + v2)
    r = np.maximum(np.maximum(_angle_deg(c, v0), _angle_deg(c, v1)), _angle_deg(c, v2))
    return c, r


def htm_trixels_in_circle(ra_deg: float, dec_deg: float, radius_deg: float, depth: int = 7) -> np.ndarray:
    """Sorted depth-`depth` trixel ids that may overlap the circle (a superset, never missing one)."""
    centre = unit_vector(ra_deg, dec_deg)
    ids = np.array([rid for rid, _ in _HTM_ROOTS], dtype=np.int64)
    v0 = np.stack([_HTM_V[t[0]] for _, t in _HTM_ROOTS])
    v1 = np.stack([_HTM_V[t[1]] for _, t in _HTM_ROOTS])
    v2 = np.stack([_HTM_V[t[2]] for _, t in _HTM_ROOTS])
    for level in range(depth + 1):
        c, r = _bounding_caps(v0, v1, v2)
        # Small slack so that round-off never drops a touching trixel.
        hit = _angle_deg(c, centre[None, :]) <= r + radius_deg + 1e-9
        ids, v0, v1, v2 = ids[hit], v0[hit], v1[hit], v2[hit]
        if level == depth:
            break
        kids = _children(v0, v1, v2)
        ids = np.concatenate([4 * ids + k for k in range(4)])
        v0 = np.concatenate([kv[0] for kv in kids])
        v1 = np.concatenate([kv[1] for kv in kids])
        v2 = np.concatenate([kv[2] for kv in kids])
    return np.sort(ids)


# --------------------------------------------------------------------------------------------
# jointcal's bounding circle
# --------------------------------------------------------------------------------------------

def _box_of_corners(x, y):
    return np.array([np.min(x), np.min(y), np.max(x), np.max(y)])


def bounding_circle(footprints, tangent_point: tuple[float, float]) -> tuple[float, float, float]:
    """jointcal's reference-loading circle (``Associations::computeBoundingCircle``).

    `footprints` yields ``(pix_to_sky, (x_min, y_min, x_max, y_max))`` per ccd-visit: a function
    of LSST pixels returning (ra, dec) degrees and the inclusive pixel bbox; `tangent_point` is
    jointcal's common tangent point (the normalised mean of the ccd-visits' boresight vectors).
    Steps, as in jointcal:

    1. each bbox's four corners go through pixel -> sky -> gnomonic projection about the
       tangent point; their x/y bounding box is the ccd-visit's frame; frames are united;
    2. that frame's four corners are deprojected to (ra, dec); their ra/dec bounding box is
       the "sky box";
    3. the four corners of the sky box form a spherical polygon; the circle is centred on its
       centroid (sphgeom's: the sum over edges of the edge normal times the edge angle), with
       radius the largest centroid-vertex angle, padded by a round-off bound (1e-9 deg here).

    No other padding is applied (jointcal loads the refcat within exactly this circle).
    Returns (ra, dec, radius), degrees.
    """
    ra0, dec0 = tangent_point
    frame = None
    for pix_to_sky, (x0, y0, x1, y1) in footprints:
        ra, dec = pix_to_sky(np.array([x0, x1, x0, x1], float), np.array([y0, y1, y1, y0], float))
        box = _box_of_corners(*sky_to_tangent(np.asarray(ra), np.asarray(dec), ra0, dec0, xp=np))
        frame = box if frame is None else np.concatenate([np.minimum(frame[:2], box[:2]),
                                                          np.maximum(frame[2:], box[2:])])
    if frame is None:
        raise InputError("bounding circle: no ccd-visit to bound")
    ra, dec = tangent_to_sky(frame[[0, 2, 0, 2]], frame[[1, 3, 3, 1]], ra0, dec0, xp=np)
    # RA may wrap at 0/360: express it continuously around the tangent point first.
    ra = ra0 + ((ra - ra0 + 180.0) % 360.0 - 180.0)
    rmin, dmin, rmax, dmax = _box_of_corners(ra, dec)
    verts = unit_vector(np.array([rmin, rmax, rmax, rmin]), np.array([dmin, dmin, dmax, dmax]))  # CCW
    cm = np.zeros(3)
    for i in range(4):
        a, b = verts[i - 1], verts[i]
        n = np.cross(a, b)
        s = np.linalg.norm(n)
        cm += n / s * np.arctan2(s, a @ b)
    cm = _normalize(cm)
    if cm @ verts.sum(axis=0) < 0:  # a clockwise vertex order gives the antipode
        cm = -cm
    # sphgeom pads by a round-off bound so the circle reliably contains the polygon; 1e-9 deg
    # (3.6 micro-arcsec) does the same here.
    radius = float(np.max(_angle_deg(verts, cm[None, :]))) + 1e-9
    cra, cdec = to_radec(cm)
    return float(cra), float(cdec), radius


# --------------------------------------------------------------------------------------------
# Refcat folders
# --------------------------------------------------------------------------------------------

def read_refcat_config(path: str | os.PathLike) -> dict[str, object]:
    """Literal assignments of a pex_config ``config.py``, without executing it.

    Returns e.g. ``{"format_version": 1, "ref_dataset_name": "sdss",
    "indexer['HTM'].depth": 7, "indexer.name": "HTM"}`` (keys: the target with the leading
    ``config.`` removed). Non-literal right-hand sides are ignored.
    """
    path = Path(path)
    try:
        tree = ast.parse(path.read_text(), filename=str(path))
    except (OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"{path}: cannot parse refcat config: {exc}") from exc
    out: dict[str, object] = {}
    for node in tree.body:
        if not isinstance(node, ast.Assign) or len(node.targets) != 1:
            continue
        target = ast.unparse(node.targets[0])
        if not target.startswith("config."):
            continue
        try:
            value = ast.literal_eval(node.value)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            continue
        out[target[len("config."):].replace('"', "'")] = value
    return out


@dataclass(frozen=True)
class LsstRefcat:
    """Reference stars read from an LSST refcat folder.

    ``flags`` holds the catalog's flag bits by name (``TFLAGn`` cards), e.g. ``photometric``
    and ``resolved`` -- the latter marks galaxies. jointcal does not drop resolved objects by
    default (its reference selectors have ``doUnresolved = False``), so neither does the reader;
    ``catalog.take(~refcat.resolved)`` drops them.
    """

    catalog: ReferenceCatalog
    flags: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (r,) bool
    name: str = ""
    shards: tuple[int, ...] = ()  # trixel ids read
    has_coordinate_errors: bool = False  # True: errors came from the catalog

    @property
    def resolved(self) -> np.ndarray:
        """(r,) bool: True for extended sources (all False when the refcat has no such flag)."""
        return self.flags.get("resolved", np.zeros(len(self.catalog), dtype=bool))


def _refcat_info(folder: Path) -> tuple[str, int, int | None]:
    """(name, depth, format_version) from config.py when present."""
    name, depth, version = folder.name, 7, None
    cfg_path = folder / "config.py"
    if cfg_path.exists():
        cfg = read_refcat_config(cfg_path)
        name = str(cfg.get("ref_dataset_name", name))
        version = cfg.get("format_version")
        for key in ("indexer['HTM'].depth", "indexer.active.depth", "indexer.depth"):
            if key in cfg:
                depth = int(cfg[key])
                break
    return name, depth, (int(version) if version is not None else None)


def _shard_files(folder: Path) -> dict[int, Path]:
    return {int(p.stem): p for p in folder.glob("*.fits") if p.stem.isdigit()}


def _open_shard(shard: Path | fits.HDUList):
    """Context manager giving the shard's HDUList (an in-memory one is left open)."""
    return fits.open(shard, memmap=False) if isinstance(shard, Path) else contextlib.nullcontext(shard)


def _flux_scale(unit: str, version: int | None, col: str, src: str) -> float:
    unit = (unit or "").strip()
    if unit == "nJy":
        return 1.0
    if unit == "Jy":
        return 1e9
    if not unit:
        if version == 0:
            return 1e9
        return 1.0
    raise InputError(f"{src}: flux column {col!r} has unit {unit!r}; expected nJy (or Jy)")


@dataclass(frozen=True)
class RefcatShards:
    """Refcat shards already opened (e.g. read from a data butler): ``{htm id: HDUList}``.

    Stands in for a refcat folder; `version` is the folder's ``format_version`` (None: the
    shards' units decide), `depth` its HTM depth.
    """

    name: str
    shards: dict[int, fits.HDUList]
    depth: int = 7
    version: int | None = None


def read_lsst_refcat(folder: str | os.PathLike | RefcatShards, ra: float, dec: float, radius_deg: float, *,
                     reference_error_mas: float | None = None) -> LsstRefcat:
    """Reference stars of an LSST refcat folder within `radius_deg` of (`ra`, `dec`) (degrees).

    `folder` may also be a `RefcatShards` (shards in memory). Raises `InputError` when the
    folder has no shard covering the circle, when no row is inside it, or when the catalog has no
    coordinate errors and `reference_error_mas` is None.
    """
    if isinstance(folder, RefcatShards):
        name, depth, version, files = folder.name, folder.depth, folder.version, folder.shards
        folder = Path(f"<refcat {folder.name}>")
    else:
        folder = Path(folder)
        if not folder.is_dir():
            raise InputError(f"{folder}: refcat folder not found")
        name, depth, version = _refcat_info(folder)
        files = _shard_files(folder)
    if not files:
        raise InputError(f"{folder}: no <htm id>.fits refcat shards in this folder")
    lo, hi = 8 * 4 ** depth, 16 * 4 ** depth
    bad = [t for t in files if not lo <= t < hi]
    if bad:
        raise InputError(f"{folder}: shard id(s) {bad[:5]} are not HTM depth-{depth} trixels")
    wanted = htm_trixels_in_circle(ra, dec, radius_deg, depth)
    present = [int(t) for t in wanted if int(t) in files]
    missing = [int(t) for t in wanted if int(t) not in files]
    if not present:
        raise InputError(
            f"{folder}: the refcat does not cover the field: none of the {len(wanted)} depth-{depth} "
            f"trixel(s) within {radius_deg:.4f} deg of ({ra:.5f}, {dec:.5f}) has a shard file "
            f"(folder has {sorted(files)[:5]}{'...' if len(files) > 5 else ''})")
    if missing:
        log.info("refcat %s: %d of %d overlapping trixel(s) have no shard file (empty there?): %s",
                 name, len(missing), len(wanted), missing[:10])

    centre = unit_vector(ra, dec)
    parts: list[dict[str, np.ndarray]] = []
    units: dict[str, str] = {}
    for tid in present:
        path = files[tid] if isinstance(files[tid], Path) else folder / f"{tid}.fits"
        with reading(path, "refcat shard"), _open_shard(files[tid]) as hdul:
            hdu = hdul[1]
            data = hdu.data
            cols = data.columns.names
            for need in ("coord_ra", "coord_dec"):
                if need not in cols:
                    raise InputError(f"{path}: required column {need!r} is missing")
            r_ra = np.asarray(data["coord_ra"], float)
            r_dec = np.asarray(data["coord_dec"], float)
            inside = _angle_deg(unit_vector(np.degrees(r_ra), np.degrees(r_dec)), centre[None, :]) <= radius_deg
            part = {c: np.asarray(data[c])[inside] for c in cols if c != "flags"}
            names = [hdu.header.get(f"TFLAG{i}") for i in range(1, 65)]
            names = [n for n in names if n]
            if "flags" in cols and names:
                bits = np.asarray(data["flags"], dtype=bool).reshape(len(data), -1)[inside]
                for i, n in enumerate(names):
                    part["flag:" + n] = bits[:, i]
            for c in data.columns:
                units[c.name] = c.unit or ""
            parts.append(part)
    common = set(parts[0]).intersection(*parts[1:]) if len(parts) > 1 else set(parts[0])
    cat = {k: np.concatenate([p[k] for p in parts]) for k in common}
    n = cat["coord_ra"].shape[0]
    if n == 0:
        raise InputError(f"{folder}: the refcat does not cover the field: no reference object within "
                         f"{radius_deg:.4f} deg of ({ra:.5f}, {dec:.5f}) in shard(s) {present}")

    ra_deg = np.degrees(cat["coord_ra"]) % 360.0
    dec_deg = np.degrees(cat["coord_dec"])
    has_err = "coord_raErr" in cat and "coord_decErr" in cat
    if reference_error_mas is not None:
        if reference_error_mas <= 0:
            raise InputError(f"reference_error_mas = {reference_error_mas} must be > 0")
        if has_err:
            log.warning("refcat %s: overriding the catalog's coordinate errors with %g mas per coordinate",
                        name, reference_error_mas)
        ra_err = np.full(n, float(reference_error_mas))
        dec_err = np.full(n, float(reference_error_mas))
    elif has_err:
        rad2mas = np.degrees(1.0) * 3.6e6
        ra_err = np.asarray(cat["coord_raErr"], float) * rad2mas
        dec_err = np.asarray(cat["coord_decErr"], float) * rad2mas
    else:
        raise InputError(f"refcat {name} ({folder}): the catalog has no coordinate errors "
                         f"(coord_raErr/coord_decErr) and reference_error_mas was not given; "
                         f"set reference_error_mas (jointcal: astrometryReferenceErr; its tests use 10 mas)")

    if "epoch" in cat:
        epoch = 2000.0 + (np.asarray(cat["epoch"], float) - 51544.5) / 365.25
    else:
        epoch = np.full(n, 2000.0)
    rad_yr2mas_yr = np.degrees(1.0) * 3.6e6
    pm = {}
    for src_col, dst in (("pm_ra", "pmra"), ("pm_dec", "pmdec"), ("pm_raErr", "pmra_err"), ("pm_decErr", "pmdec_err")):
        pm[dst] = np.asarray(cat[src_col], float) * rad_yr2mas_yr if src_col in cat else None

    fluxes: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for col in sorted(cat):
        if not col.endswith("_flux") or col.startswith("flag:"):
            continue
        band = col[: -len("_flux")]
        scale = _flux_scale(units.get(col, ""), version, col, str(folder))
        flux = np.asarray(cat[col], float) * scale
        err_col = next((c for c in (f"{band}_fluxErr", f"{band}_fluxSigma") if c in cat), None)
        err = (np.asarray(cat[err_col], float) * _flux_scale(units.get(err_col, ""), version, err_col, str(folder))
               if err_col else np.full(n, np.nan))
        fluxes[band] = (flux, err)

    # Rows the data model rejects (non-finite position or error) are dropped, loudly.
    good = np.isfinite(ra_deg) & np.isfinite(dec_deg) & (ra_err > 0) & (dec_err > 0) & np.isfinite(epoch)
    if not good.all():
        log.warning("refcat %s: dropping %d row(s) with non-finite position, epoch or error",
                    name, int((~good).sum()))
    ref_id = np.asarray(cat["id"], np.int64) if "id" in cat else np.arange(n, dtype=np.int64)
    catalog = ReferenceCatalog(
        ref_id=ref_id[good], ra=ra_deg[good], dec=dec_deg[good], ra_err=ra_err[good], dec_err=dec_err[good],
        epoch=epoch[good],
        **{k: (v[good] if v is not None else None) for k, v in pm.items()},
        fluxes={b: (f[good], e[good]) for b, (f, e) in fluxes.items()},
    )
    flags = {k[len("flag:"):]: v[good] for k, v in cat.items() if k.startswith("flag:")}
    log.info("refcat %s: %d object(s) within %.4f deg of (%.5f, %.5f) from shard(s) %s; bands %s; "
             "%d resolved", name, len(catalog), radius_deg, ra, dec, present, sorted(fluxes),
             int(flags.get("resolved", np.zeros(0, bool)).sum()))
    return LsstRefcat(catalog=catalog, flags=flags, name=name, shards=tuple(present),
                      has_coordinate_errors=has_err)
