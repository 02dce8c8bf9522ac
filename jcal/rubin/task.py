"""`JcalPipelineTask`: jcal's joint calibration as an ``lsst.pipe.base.PipelineTask``.

Quantum: one per (instrument, skymap, tract, physical_filter), as jointcal's -- every visit of
that filter overlapping the tract is fitted together. Inputs (read with ``butlerQC.get``):

================================  ====================  ==================  ======================
connection                        default dataset type  storage class       dimensions
================================  ====================  ==================  ======================
inputSourceTableVisit             sourceTable_visit     ArrowTable          instrument, visit
inputVisitSummary                 visitSummary          JcalFits (*)        instrument, visit
referenceCatalog (prerequisite)   ps1_pv3_3pi_20170110  JcalFits (*)        skypix (htm7)
================================  ====================  ==================  ======================

(*) ``JcalFits`` is the FITS file as an astropy HDUList (`jcal.rubin.storage`); where afw is
installed the standard ``ExposureCatalog``/``SimpleCatalog`` datasets convert to it, and a
``DataFrame``/``ArrowAstropy`` source table converts to ``ArrowTable`` in daf_butler itself.

Outputs (``butlerQC.put``): ``jcalSkyWcsCatalog`` (per visit and tract: one row per detector,
``header`` = the fitted TAN-SIP FITS header as text; only with doAstrometry),
``jcalPhotoCalibCatalog`` (per visit and tract: mean calibration in nJy/count, its error, zero
point; only with doPhotometry), ``jcalFittedStars`` and ``jcalMeasurements`` (ArrowAstropy, per
tract and filter) and ``jcalMetrics`` (StructuredDataDict: jointcal's metric names).

The fit itself is `jcal.task.JointcalTask` (the facade) on `jcal.io.lsst.read_lsst` of the
in-memory inputs: the same code as ``jcal fit --lsst``.
"""

from __future__ import annotations

import json
from typing import Any

import lsst.pex.config as pexConfig
import lsst.pipe.base as pipeBase
import lsst.pipe.base.connectionTypes as cT
import numpy as np
from astropy.table import Table

from ..io.lsst_objects import lsst_paths_from_objects
from ..result import _jsonable
from ..task.jointcal import JointcalConfig, JointcalTask
from .config import pex_fields, to_jointcal_config

__all__ = ["JcalConnections", "JcalPipelineConfig", "JcalPipelineTask", "output_tables"]


class JcalConnections(pipeBase.PipelineTaskConnections,
                      dimensions=("skymap", "tract", "instrument", "physical_filter")):
    inputSourceTableVisit = cT.Input(
        doc="Source tables of each visit (jointcal's sourceTable_visit; per-detector rows).",
        name="sourceTable_visit", storageClass="ArrowTable", dimensions=("instrument", "visit"),
        multiple=True, deferLoad=True)
    inputVisitSummary = cT.Input(
        doc="Per-visit summaries (afw ExposureCatalog as FITS): bbox, band, first-guess SkyWcs, PhotoCalib, "
            "VisitInfo of each detector.",
        name="visitSummary", storageClass="JcalFits", dimensions=("instrument", "visit"),
        multiple=True, deferLoad=True)
    referenceCatalog = cT.PrerequisiteInput(
        doc="HTM-sharded reference catalog (LSST refcat format) for astrometry and photometry.",
        name="ps1_pv3_3pi_20170110", storageClass="JcalFits", dimensions=("skypix",),
        multiple=True, deferLoad=True)
    outputWcs = cT.Output(
        doc="Fitted TAN-SIP WCS of each detector of a visit (column 'header': FITS header text).",
        name="jcalSkyWcsCatalog", storageClass="ArrowAstropy",
        dimensions=("instrument", "visit", "skymap", "tract"), multiple=True)
    outputPhotoCalib = cT.Output(
        doc="Fitted photometric calibration of each detector of a visit (nJy per count, zero point).",
        name="jcalPhotoCalibCatalog", storageClass="ArrowAstropy",
        dimensions=("instrument", "visit", "skymap", "tract"), multiple=True)
    outputStars = cT.Output(doc="Fitted stars.", name="jcalFittedStars", storageClass="ArrowAstropy",
                            dimensions=("instrument", "skymap", "tract", "physical_filter"))
    outputMeasurements = cT.Output(doc="Measurements with residuals and outlier flags.", name="jcalMeasurements",
                                   storageClass="ArrowAstropy",
                                   dimensions=("instrument", "skymap", "tract", "physical_filter"))
    outputMetrics = cT.Output(doc="Fit metrics (jointcal's names: photometry_final_chi2, ...).",
                              name="jcalMetrics", storageClass="StructuredDataDict",
                              dimensions=("instrument", "skymap", "tract", "physical_filter"))

    def __init__(self, *, config=None):
        super().__init__(config=config)
        if config is not None and not config.doAstrometry:
            del self.outputWcs
        if config is not None and not config.doPhotometry:
            del self.outputPhotoCalib


class JcalPipelineConfig(pipeBase.PipelineTaskConfig, pipelineConnections=JcalConnections):
    """jointcal's config fields (generated from `jcal.task.JointcalConfig`), plus the input options."""

    # The facade's field table, as pex_config fields (a class body's locals() is the class namespace).
    locals().update(pex_fields(JointcalConfig))
    sourceFluxType = pexConfig.Field(doc="flux whose <name>_instFlux(Err) columns are fitted (jointcal's "
                                         "sourceFluxType)", dtype=str, default="apFlux_12_0")

    def toJointcalConfig(self) -> JointcalConfig:
        """The validated facade config (`jcal.task.JointcalConfig`) of these values."""
        return to_jointcal_config(self, JointcalConfig)

    def validate(self):
        super().validate()
        self.toJointcalConfig()  # cross-field checks and the FitConfig mapping


class JcalPipelineTask(pipeBase.PipelineTask):
    """Joint astrometric/photometric calibration of the visits of one tract and filter (see module doc)."""

    ConfigClass = JcalPipelineConfig
    _DefaultName = "jcal"

    def __init__(self, *, config=None, log=None, initInputs=None, **kwargs):
        super().__init__(config=config, log=log, initInputs=initInputs, **kwargs)
        self.fitter = JointcalTask(config=self.config.toJointcalConfig(), log=self.log)

    def runQuantum(self, butlerQC, inputRefs, outputRefs):
        """Read the quantum's inputs with ``butlerQC.get``, `run`, write with ``butlerQC.put``."""
        inputs = butlerQC.get(inputRefs)
        # Shards are keyed by their trixel id; the skypix dimension (e.g. htm7) gives the depth.
        shards = {int(next(iter(h.dataId.required.values()))): h for h in inputs["referenceCatalog"]}
        refs = inputRefs.referenceCatalog
        skypix = next(iter(refs[0].datasetType.dimensions.required)) if refs else "htm7"
        struct = self.run(inputSourceTableVisit=inputs["inputSourceTableVisit"],
                          inputVisitSummary=inputs["inputVisitSummary"], referenceCatalog=shards,
                          refcatName=refs[0].datasetType.name if refs else "refcat",
                          refcatDepth=int(skypix.removeprefix("htm")) if skypix.startswith("htm") else 7,
                          tract=butlerQC.quantum.dataId["tract"])
        for name in ("outputWcs", "outputPhotoCalib"):
            per_visit = getattr(struct, name, None)
            for ref in getattr(outputRefs, name, []) if per_visit is not None else []:
                table = per_visit.get(int(ref.dataId["visit"]))
                if table is None:
                    self.log.warning("%s: visit %s kept no source; nothing written", name, ref.dataId["visit"])
                else:
                    butlerQC.put(table, ref)
        for name in ("outputStars", "outputMeasurements", "outputMetrics"):
            butlerQC.put(getattr(struct, name), getattr(outputRefs, name))

    def run(self, inputSourceTableVisit, inputVisitSummary, referenceCatalog, refcatName="refcat",
            refcatDepth=7, tract=None) -> pipeBase.Struct:
        """Fit in-memory inputs.

        Parameters
        ----------
        inputSourceTableVisit, inputVisitSummary
            Lists of source tables and visitSummary HDULists (or deferred butler handles to them).
        referenceCatalog
            {HTM trixel id: refcat shard HDUList (or a deferred handle)}.
        refcatName, refcatDepth
            The reference catalog's name (for messages) and HTM depth.
        tract
            The tract id (logged and recorded in the metrics).

        Returns
        -------
        Struct(outputWcs={visit: Table}, outputPhotoCalib={visit: Table}, outputStars, outputMeasurements,
        outputMetrics, fitResult)
        """
        def load(x):  # a deferred butler handle, or the object itself
            return x.get() if hasattr(x, "dataId") and hasattr(x, "get") else x

        paths = lsst_paths_from_objects([load(h) for h in inputSourceTableVisit],
                                        [load(h) for h in inputVisitSummary],
                                        {k: load(h) for k, h in referenceCatalog.items()}, refcatName,
                                        refcat_depth=refcatDepth)
        data = self.fitter.readInputs(paths, lsst=True, flux_type=self.config.sourceFluxType)
        with self.timer("fit"):
            fit = self.fitter.run(data)
        out = output_tables(fit, tract)
        for k, v in out.outputMetrics.items():
            if isinstance(v, (int, float, bool, str)):
                self.metadata[k] = v
        return out

    def getSchemaCatalogs(self) -> dict[str, Any]:
        """The output tables' schemas (empty pyarrow tables), known after `run`."""
        return self.fitter.getSchemaCatalogs()

    def getAllSchemaCatalogs(self) -> dict[str, Any]:
        return self.fitter.getAllSchemaCatalogs()


def output_tables(fit: pipeBase.Struct, tract: int | None = None) -> pipeBase.Struct:
    """The butler outputs of a facade `JointcalTask.run` Struct (see the module docstring)."""
    result = fit.fitResult
    metrics = _jsonable(fit.metrics)
    if tract is not None:
        metrics["tract"] = int(tract)
    out = pipeBase.Struct(outputStars=_table(result.star_table()),
                          outputMeasurements=_table(result.measurement_table()),
                          outputMetrics=metrics, fitResult=result)
    if fit.wcsHeaders:
        out.outputWcs = _per_visit({k: {"header": h.tostring(sep="\n")} for k, h in fit.wcsHeaders.items()})
    if result.photometry is not None:
        cal = result.photometry.calibration_table()
        rows = {(int(v), int(d)): {c: cal[c][i] for c in cal if c not in ("visit", "detector")}
                for i, (v, d) in enumerate(zip(cal["visit"], cal["detector"]))}
        out.outputPhotoCalib = _per_visit(rows)
    return out


def _table(columns: dict[str, np.ndarray]) -> Table:
    return Table({k: np.asarray(v) for k, v in columns.items()})


def _per_visit(rows: dict[tuple[int, int], dict[str, Any]]) -> dict[int, Table]:
    """{(visit, detector): {column: value}} -> {visit: Table with a 'detector' column}."""
    out: dict[int, Table] = {}
    for visit in sorted({v for v, _ in rows}):
        dets = sorted(d for v, d in rows if v == visit)
        cols = {"detector": np.array(dets, dtype=np.int64)}
        for c in rows[(visit, dets[0])]:
            cols[c] = np.array([rows[(visit, d)][c] for d in dets])
        out[visit] = Table(cols)
    return out


def metrics_json(metrics: dict) -> str:
    """The metrics as indented JSON (what the example writes to metrics.json)."""
    return json.dumps(_jsonable(metrics), indent=2, sort_keys=True) + "\n"
