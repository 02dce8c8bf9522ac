"""LSST inputs handed over in memory (by a data butler) instead of as files.

What: converters from the objects a butler returns -- a source table as a pyarrow/astropy/pandas
table, a visitSummary or refcat shard as an ``astropy.io.fits.HDUList`` (or, with afw, an afw
catalog) -- to what `jcal.io.lsst.read_lsst` takes (`LsstPaths` with in-memory entries), so
the middleware path and ``jcal fit --lsst`` run the very same readers and selection.

Why here and not in ``jcal.rubin``: the Gen2-style ``JointcalTask.runDataRef`` needs them too,
and must work without the Rubin middleware installed. Nothing here imports ``lsst``.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
from astropy.io import fits

from jcal.data import InputError
from jcal.io.lsst_refcat import RefcatShards

__all__ = ["afw_catalog_to_hdulist", "as_hdulist", "as_source_table", "hdulist_from_bytes", "lsst_paths_from_datarefs",
           "lsst_paths_from_objects"]


def hdulist_from_bytes(data: bytes) -> fits.HDUList:
    """An in-memory HDUList of a FITS file's bytes (no file handle left open, no memory map)."""
    return fits.open(io.BytesIO(data), memmap=False, lazy_load_hdus=False)


def afw_catalog_to_hdulist(catalog: Any) -> fits.HDUList:
    """An afw table catalog (ExposureCatalog, SimpleCatalog) as the FITS file afw writes for it.

    Needs afw (a full LSST installation): the catalog writes itself (``writeFits``).
    """
    fd, name = tempfile.mkstemp(suffix=".fits")
    os.close(fd)
    try:
        catalog.writeFits(name)
        return hdulist_from_bytes(Path(name).read_bytes())
    finally:
        os.unlink(name)


def as_hdulist(obj: Any, what: str) -> fits.HDUList | Path:
    """A FITS-backed input as an HDUList (or a path, left to the readers)."""
    if isinstance(obj, (fits.HDUList, Path)):
        return obj
    if isinstance(obj, (str, os.PathLike)):
        return Path(obj)
    if isinstance(obj, (bytes, bytearray)):
        return hdulist_from_bytes(bytes(obj))
    if hasattr(obj, "writeFits"):
        return afw_catalog_to_hdulist(obj)
    raise InputError(f"{what}: expected an astropy HDUList, FITS bytes, a path or an afw catalog, "
                     f"got {type(obj).__name__}")


def as_source_table(obj: Any, what: str) -> pa.Table | Path:
    """A source table as a pyarrow Table (pandas and astropy tables converted), or a path."""
    if isinstance(obj, (pa.Table, Path)):
        return obj
    if isinstance(obj, (str, os.PathLike)):
        return Path(obj)
    module = type(obj).__module__
    if module.startswith("pandas"):
        return pa.Table.from_pandas(obj)  # the index (e.g. sourceId) becomes a column
    if module.startswith("astropy.table"):
        return pa.table({name: obj[name].data for name in obj.colnames})
    raise InputError(f"{what}: expected a pyarrow, pandas or astropy table or a path, got {type(obj).__name__}")


def lsst_paths_from_objects(sources: Iterable[Any], visit_summaries: Iterable[Any],
                            refcat_shards: Mapping[int, Any], refcat_name: str, *,
                            refcat_depth: int = 7, refcat_version: int | None = None):
    """An `LsstPaths` whose entries are the given in-memory objects.

    Parameters
    ----------
    sources
        Source tables (``sourceTable_visit`` or per-detector), any form `as_source_table` takes.
    visit_summaries
        visitSummary catalogs, any form `as_hdulist` takes.
    refcat_shards
        {HTM trixel id: shard}, any form `as_hdulist` takes.
    refcat_name, refcat_depth, refcat_version
        The reference catalog's name, HTM depth and ``format_version`` (None: from the shards' units).
    """
    from jcal.io.lsst import LsstPaths
    srcs = tuple(as_source_table(s, f"source table {i}") for i, s in enumerate(sources))
    summaries = tuple(as_hdulist(s, f"visitSummary {i}") for i, s in enumerate(visit_summaries))
    if not srcs:
        raise InputError("no source tables given")
    if not summaries:
        raise InputError("no visitSummary given")
    if not refcat_shards:
        raise InputError(f"refcat {refcat_name}: no shard given (does the reference catalog cover the field?)")
    shards = {}
    for tid, shard in refcat_shards.items():
        obj = as_hdulist(shard, f"refcat {refcat_name} shard {tid}")
        shards[int(tid)] = obj if isinstance(obj, fits.HDUList) else hdulist_from_bytes(obj.read_bytes())
    return LsstPaths(sources=srcs, visit_summaries=summaries,
                     refcat=RefcatShards(name=refcat_name, shards=shards, depth=refcat_depth,
                                         version=refcat_version))


def _with_ids(table: pa.Table | Path, data_id: Mapping[str, Any]) -> pa.Table | Path:
    """Add constant visit/detector columns from the data ID where an in-memory table lacks them."""
    if isinstance(table, pa.Table):
        for key in ("visit", "detector"):
            if key not in table.column_names and key in data_id:
                table = table.append_column(key, pa.array([int(data_id[key])] * table.num_rows, pa.int64()))
    return table


def lsst_paths_from_datarefs(dataRefs: Iterable[Any]):
    """An `LsstPaths` from Gen2-style data references (``.dataId`` with ``visit``; ``.get(datasetType)``).

    Each reference gives ``get("sourceTable")`` (its detector's or visit's source table) and
    ``get("visitSummary")`` (read once per visit); the first gives ``get("refcat")``: a refcat
    folder (path) or ``{HTM id: shard}`` -- jointcal's Gen2 task loaded it through the butler instead.
    """
    from jcal.io.lsst import LsstPaths
    refs = list(dataRefs)
    if not refs:
        raise InputError("runDataRef: no data references given")
    sources, summaries = [], {}
    for i, ref in enumerate(refs):
        data_id = dict(ref.dataId)
        if "visit" not in data_id:
            raise InputError(f"data reference {i}: dataId {data_id} has no 'visit'")
        sources.append(_with_ids(as_source_table(ref.get("sourceTable"), f"sourceTable {data_id}"), data_id))
        if data_id["visit"] not in summaries:
            summaries[data_id["visit"]] = as_hdulist(ref.get("visitSummary"), f"visitSummary {data_id}")
    refcat = refs[0].get("refcat")
    if isinstance(refcat, (str, os.PathLike)):
        return LsstPaths(sources=tuple(sources), visit_summaries=tuple(summaries.values()), refcat=Path(refcat))
    if isinstance(refcat, RefcatShards):
        return lsst_paths_from_objects(sources, summaries.values(), refcat.shards, refcat.name,
                                       refcat_depth=refcat.depth, refcat_version=refcat.version)
    return lsst_paths_from_objects(sources, summaries.values(), refcat, "refcat")
