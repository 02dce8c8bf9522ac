"""Put an LSST-layout folder (like ``tests/data/cfht_minimal``) into a butler repository; read metrics back.

What: `ingest_lsst_folder` registers, in an existing repository (made with ``butler create REPO
--seed-config`` `jcal.rubin.storage.SEED_CONFIG`), the dimension records the data need --
instrument, physical filter, detectors, day_obs, visits with their sky regions (from the
visitSummary corners), a skymap with tracts covering the visits -- and ingests the source tables
(``sourceTable_visit``), visitSummary files (``visitSummary``) and refcat shards (one dataset type
named after the refcat folder, dimension htm7), chained under one input collection.
`read_metrics` reads ``jcalMetrics`` back from an output collection.

Why: a repository without an LSST Instrument class or lsst.skymap (neither is on PyPI) still
needs these records for ``pipetask`` to build quanta; dimension records inserted directly are
what an instrument's ``register`` and ``makeSkyMap`` would write.

Command line (what ``examples/rubin/run_cfht_minimal.sh`` runs)::

    python -m jcal.rubin.repo ingest REPO FOLDER [--instrument NAME] [--skymap NAME] [--tracts 0 1]
    python -m jcal.rubin.repo metrics REPO COLLECTION OUT.json
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from astropy.io import fits
from astropy.time import Time
from lsst.daf.butler import Butler, CollectionType, DatasetRef, DatasetType, FileDataset, Timespan
from lsst.sphgeom import Angle, Circle, ConvexPolygon, LonLat, UnitVector3d

from ..data import InputError
from ..io.lsst import LsstPaths
from ..io.lsst_refcat import read_refcat_config
from ..io.lsst_wcs import read_visit_summary
from .task import metrics_json

__all__ = ["ingest_lsst_folder", "read_metrics", "main"]

log = logging.getLogger("jcal.rubin.repo")


def _vec(ra_deg: float, dec_deg: float) -> UnitVector3d:
    return UnitVector3d(LonLat.fromDegrees(float(ra_deg), float(dec_deg)))


def _detector_regions(path: Path) -> dict[int, ConvexPolygon]:
    """{detector: polygon of its four corners} from a visitSummary's raCorners/decCorners (deg)."""
    with fits.open(path) as hdul:
        rows = hdul[1].data
        for need in ("id", "raCorners", "decCorners"):
            if need not in rows.columns.names:
                raise InputError(f"{path}: visitSummary column {need!r} (needed for the visit region) is missing")
        return {int(r["id"]): ConvexPolygon([_vec(a, d) for a, d in zip(r["raCorners"], r["decCorners"])])
                for r in rows}


def _register_dimensions(butler: Butler, instrument: str, summaries: dict[Path, list], regions: dict,
                         skymap: str, tracts: list[int], tract_margin_deg: float) -> None:
    reg = butler.registry
    rows = [r for rs in summaries.values() for r in rs]
    reg.syncDimensionData("instrument", {"name": instrument, "visit_max": 2**31 - 1, "exposure_max": 2**31 - 1,
                                         "detector_max": 1 + max(r.detector for r in rows), "visit_system": 0})
    for phys, band in sorted({(r.physical_filter, r.band) for r in rows}):
        reg.syncDimensionData("physical_filter", {"instrument": instrument, "name": phys, "band": band})
    for det in sorted({r.detector for r in rows}):
        reg.syncDimensionData("detector", {"instrument": instrument, "id": det, "full_name": f"ccd{det}",
                                           "purpose": "SCIENCE"})
    corners = []
    for path, rs in summaries.items():
        r0 = rs[0]
        vi = r0.visit_info
        if vi is None:
            raise InputError(f"{path}: no VisitInfo (needed for the visit's time and day_obs)")
        start = Time(vi.mjd - 0.5 * vi.exptime / 86400, format="mjd", scale="tai")
        end = Time(vi.mjd + 0.5 * vi.exptime / 86400, format="mjd", scale="tai")
        day_obs = int(start.utc.strftime("%Y%m%d"))
        reg.syncDimensionData("day_obs", {"instrument": instrument, "id": day_obs})
        polys = regions[path]
        visit_region = ConvexPolygon.convexHull([v for p in polys.values() for v in p.getVertices()])
        corners += [v for p in polys.values() for v in p.getVertices()]
        reg.syncDimensionData("visit", {
            "instrument": instrument, "id": r0.visit, "name": str(r0.visit), "physical_filter": r0.physical_filter,
            "day_obs": day_obs, "exposure_time": vi.exptime, "region": visit_region,
            "timespan": Timespan(start, end)})
        for det, poly in polys.items():
            reg.syncDimensionData("visit_detector_region", {"instrument": instrument, "visit": r0.visit,
                                                            "detector": det, "region": poly})
    # Tracts: circles around every visit (the same region for each tract id: independent quanta).
    xyz = np.array([[v.x(), v.y(), v.z()] for v in corners]).sum(axis=0)
    centre = UnitVector3d(*xyz)  # normalised
    radius = max(np.degrees(np.arccos(np.clip(centre.dot(v), -1, 1))) for v in corners) + tract_margin_deg
    tract_region = Circle(centre, Angle.fromDegrees(radius))
    digest = hashlib.sha1(f"jcal {skymap} {sorted(tracts)} {radius:.6f}".encode()).digest()
    reg.syncDimensionData("skymap", {"name": skymap, "hash": digest, "tract_max": max(tracts) + 1,
                                     "patch_nx_max": 1, "patch_ny_max": 1})
    for t in tracts:
        reg.syncDimensionData("tract", {"skymap": skymap, "id": t, "region": tract_region})


def _ingest(butler: Butler, name: str, dimensions: tuple[str, ...], storage_class: str, run: str,
            files: list[tuple[dict, Path]]) -> None:
    dtype = DatasetType(name, dimensions, storage_class, universe=butler.dimensions)
    butler.registry.registerDatasetType(dtype)
    butler.registry.registerRun(run)
    datasets = [FileDataset(path=str(Path(p).resolve()), refs=[DatasetRef(dtype, butler.registry.expandDataId(data_id), run=run)])
                for data_id, p in files]
    butler.ingest(*datasets, transfer="copy")
    log.info("ingested %d %s dataset(s) into %s", len(datasets), name, run)


def _put_source_tables(butler: Butler, instrument: str, files, visits: set[int], run: str) -> None:
    """One ``sourceTable_visit`` per visit: the per-detector tables of the visit, concatenated.

    Put rather than ingested: daf_butler's parquet formatter only accepts ``.parq`` names.
    """
    dtype = DatasetType("sourceTable_visit", ("instrument", "visit"), "ArrowTable", universe=butler.dimensions)
    butler.registry.registerDatasetType(dtype)
    butler.registry.registerRun(run)
    by_visit: dict[int, list] = {}
    for p in files:
        table = pq.read_table(p)
        for need in ("visit", "detector"):
            if need not in table.column_names:
                raise InputError(f"{p}: column {need!r} is missing (a sourceTable_visit needs it)")
        for visit in np.unique(table.column("visit").to_numpy()):
            if int(visit) not in visits:
                raise InputError(f"{p}: visit {visit} has no visitSummary")
            by_visit.setdefault(int(visit), []).append(table.filter(pc.equal(table.column("visit"), visit)))
    for visit, tables in sorted(by_visit.items()):
        butler.put(pa.concat_tables(tables, promote_options="default"), dtype,
                   {"instrument": instrument, "visit": visit}, run=run)
    log.info("put %d sourceTable_visit dataset(s) into %s", len(by_visit), run)


def ingest_lsst_folder(repo: str | os.PathLike, folder: str | os.PathLike, *, instrument: str = "MegaPrime",
                       skymap: str = "jcal_skymap", tracts: list[int] = (0,), collection: str = "jcal/inputs",
                       tract_margin_deg: float = 0.1) -> str:
    """Register dimensions and ingest `folder` (laid out as `jcal.io.lsst.LsstPaths.from_folder` reads).

    Returns the chained input collection (`collection`), which holds the runs
    ``<collection>/data`` (source tables, visit summaries) and ``refcats/<refcat>``.
    Source tables (per detector or per visit, with ``visit``/``detector`` columns) are merged
    per visit into ``sourceTable_visit``; calexp headers and the camera are not ingested (the
    first-guess WCS is the visitSummary SkyWcs, as jointcal's).
    """
    paths = LsstPaths.from_folder(folder)
    butler = Butler.from_config(str(repo), writeable=True)
    summaries = {Path(p): read_visit_summary(p) for p in paths.visit_summaries}
    regions = {p: _detector_regions(p) for p in summaries}
    _register_dimensions(butler, instrument, summaries, regions, skymap, list(tracts), tract_margin_deg)

    data_run = f"{collection}/data"
    by_visit = {rs[0].visit: p for p, rs in summaries.items()}
    _put_source_tables(butler, instrument, paths.sources, set(by_visit), data_run)
    _ingest(butler, "visitSummary", ("instrument", "visit"), "JcalFits", data_run,
            [({"instrument": instrument, "visit": v}, p) for v, p in sorted(by_visit.items())])

    cfg = read_refcat_config(paths.refcat / "config.py") if (paths.refcat / "config.py").exists() else {}
    depth = int(cfg.get("indexer['HTM'].depth", 7))
    refcat_name = paths.refcat.name.replace("-", "_")
    refcat_run = f"refcats/{refcat_name}"
    shards = sorted(p for p in paths.refcat.glob("*.fits") if p.stem.isdigit())
    _ingest(butler, refcat_name, (f"htm{depth}",), "JcalFits", refcat_run,
            [({f"htm{depth}": int(p.stem)}, p) for p in shards])

    butler.registry.registerCollection(collection, CollectionType.CHAINED)
    butler.registry.setCollectionChain(collection, [data_run, refcat_run])
    return collection


def read_metrics(repo: str | os.PathLike, collection: str) -> list[dict]:
    """Every ``jcalMetrics`` dataset in `collection`, each with its data ID under ``"dataId"``."""
    butler = Butler.from_config(str(repo), collections=[collection])
    refs = sorted(butler.query_datasets("jcalMetrics", collections=collection),
                  key=lambda r: tuple(str(v) for v in r.dataId.required.values()))
    return [{**butler.get(ref), "dataId": {k: v for k, v in ref.dataId.required.items()}} for ref in refs]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jcal.rubin.repo", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    ing = sub.add_parser("ingest", help="register dimensions and ingest an LSST-layout folder")
    ing.add_argument("repo")
    ing.add_argument("folder")
    ing.add_argument("--instrument", default="MegaPrime")
    ing.add_argument("--skymap", default="jcal_skymap")
    ing.add_argument("--tracts", type=int, nargs="+", default=[0])
    ing.add_argument("--collection", default="jcal/inputs")
    met = sub.add_parser("metrics", help="write the jcalMetrics of a collection to a JSON file")
    met.add_argument("repo")
    met.add_argument("collection")
    met.add_argument("out")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s %(levelname)s: %(message)s")
    if args.cmd == "ingest":
        print(ingest_lsst_folder(args.repo, args.folder, instrument=args.instrument, skymap=args.skymap,
                                 tracts=args.tracts, collection=args.collection))
        return 0
    metrics = read_metrics(args.repo, args.collection)
    if not metrics:
        print(f"no jcalMetrics in collection {args.collection!r}", file=sys.stderr)
        return 1
    text = metrics_json(metrics[0] if len(metrics) == 1 else metrics)
    tmp = Path(args.out).with_name(Path(args.out).name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, args.out)  # atomic
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
