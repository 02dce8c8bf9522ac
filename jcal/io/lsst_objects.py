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

__all__ = ["afw_catalog_to_hdulist", "as_hdulist", "as_source_table", "hdulist_from_bytes", "lsst_paths_from_objects"]


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
