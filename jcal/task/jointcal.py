"""`JointcalConfig` / `JointcalTask` and their subtasks (see the `jcal.task` docstring)."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..config import ConfigError, FitConfig
from ..data import InputData
from ..io.lsst_sources import DEFAULT_BAD_FLAGS
from ..progress import Progress, capture_warnings, step
from .base import Struct, Task, TaskError, write_checked
from .config import ChoiceField, Config, Field, FieldValidationError, ListField, RangeField
from .timing import timeMethod, timing_table

__all__ = ["JointcalConfig", "JointcalTask", "SourceSelectorConfig", "SourceSelectorTask", "AssociationConfig",
           "AssociationTask", "ReferenceLoaderConfig", "ReferenceLoaderTask", "AstrometryFitConfig",
           "AstrometryFitTask", "PhotometryFitConfig", "PhotometryFitTask", "FIELD_MAP"]

_D = FitConfig()
_SCREEN_MODES = {"drop": "drop them with a warning, counted in metrics.json",
                 "error": "raise InputError naming them"}
_PHOT_MODELS = {"constrainedMagnitude": "constrained_magnitude", "constrainedFlux": "constrained_flux",
                "simpleMagnitude": "simple_magnitude", "simpleFlux": "simple_flux"}
_PHOT_MODELS_BY_CORE = {v: k for k, v in _PHOT_MODELS.items()}


# ------------------------------------------------------------------------------------------ subtasks
class SourceSelectorConfig(Config):
    badFlags = ListField("flags that reject a source (applied when reading LSST tables; jcal's own "
                         "input format carries no flags)", str,
                         default=DEFAULT_BAD_FLAGS)
    signalToNoiseMin = RangeField("keep sources with instFlux/instFluxErr > this", float, default=_D.min_snr, min=0.0)
    isolated = Field("require isolated sources (parentSourceId == 0 and deblend_nChild == 0; LSST tables)",
                     bool, default=True)
    unresolved = Field("require unresolved sources (sizeExtendedness < 0.5; LSST tables)", bool, default=False)


class SourceSelectorTask(Task):
    """Selects detections by S/N (and by flags/isolation/extendedness when reading LSST tables)."""

    ConfigClass = SourceSelectorConfig
    _DefaultName = "sourceSelector"

    def lsst_selection(self):
        from ..io.lsst_sources import LsstSourceSelection
        c = self.config
        return LsstSourceSelection(bad_flags=tuple(c.badFlags), min_snr=c.signalToNoiseMin,
                                   require_isolated=c.isolated, unresolved=c.unresolved)

    @timeMethod
    def run(self, sources) -> Struct:
        """Struct(selected: bool mask, sourceCat: the kept rows)."""
        snr = sources.inst_flux / sources.inst_flux_err
        selected = snr > self.config.signalToNoiseMin
        self.metadata["nSelected"] = int(selected.sum())
        self.metadata["nTotal"] = int(len(sources))
        self.log.info("selected %d of %d sources", selected.sum(), len(sources))
        return Struct(selected=selected, sourceCat=sources if selected.all() else sources.take(np.flatnonzero(selected)))


class AssociationConfig(Config):
    pass


class AssociationTask(Task):
    """Groups detections into stars and matches them to the reference catalog (`jcal.associate`)."""

    ConfigClass = AssociationConfig
    _DefaultName = "associate"

    @timeMethod
    def run(self, data: InputData, fitConfig: FitConfig):
        from ..associate import associate
        assoc = associate(data, fitConfig)
        self.metadata["nStars"] = int(assoc.n_stars)
        self.metadata["nMeasurements"] = int(assoc.n_measurements)
        return assoc


class ReferenceLoaderConfig(Config):
    anyFilterMapsToThis = Field("reference catalog band used for every visit band (None: same band name)",
                                str, default=_D.reference_band, optional=True)


class ReferenceLoaderTask(Task):
    """Provides the reference catalog (in jcal it is part of the input data)."""

    ConfigClass = ReferenceLoaderConfig
    _DefaultName = "refObjLoader"

    @timeMethod
    def run(self, data: InputData) -> Struct:
        refCat = data.refcat
        self.metadata["nReferenceStars"] = int(len(refCat.ra)) if hasattr(refCat, "ra") else 0
        return Struct(refCat=refCat)


class AstrometryFitConfig(Config):
    pass


class AstrometryFitTask(Task):
    """The astrometric fit (`jcal.calibration.astrometry.fit_astrometry`)."""

    ConfigClass = AstrometryFitConfig
    _DefaultName = "astrometryFit"

    @timeMethod
    def run(self, data, association, fitConfig, *, model=None, mapping_filter=None, progress=None):
        from ..calibration.astrometry import fit_astrometry
        fit = fit_astrometry(data, association, fitConfig, model=model, mapping_filter=mapping_filter,
                             progress=progress)
        self.metadata["chi2"] = float(fit.chi2)
        self.metadata["ndof"] = int(fit.ndof)
        return fit


class PhotometryFitConfig(Config):
    pass


class PhotometryFitTask(Task):
    """The photometric fit (`jcal.calibration.photometry.fit_photometry`), when this build has it."""

    ConfigClass = PhotometryFitConfig
    _DefaultName = "photometryFit"

    @timeMethod
    def run(self, data, association, fitConfig, *, astrometry=None, progress=None):
        try:
            from ..calibration.photometry import fit_photometry
        except ImportError:
            self.log.warning("photometry is not available in this build; skipped")
            self.metadata["skipped"] = True
            return None
        return fit_photometry(data, association, fitConfig, astrometry=astrometry, progress=progress)


# ------------------------------------------------------------------------------------------ config
class JointcalConfig(Config):
    """jointcal's config field names, mapped onto `jcal.FitConfig` by `toFitConfig` (see FIELD_MAP)."""

    doAstrometry = Field("fit astrometry", bool, default=_D.astrometry)
    doPhotometry = Field("fit photometry", bool, default=_D.photometry)
    astrometryModel = ChoiceField("astrometric model", str, default=_D.astrometry_model, allowed={
        "radial": "[jcal] per-detector map, radial optical distortion shared by all visits, per-visit map",
        "constrained": "per-detector map then per-visit map", "simple": "one map per detector-visit"})
    astrometrySimpleOrder = RangeField("polynomial order of the simple model", int, default=_D.simple_order,
                                       min=1, max=12)
    astrometryChipOrder = RangeField("order of the per-detector map (radial, constrained)", int, default=_D.chip_order,
                                     min=1, max=12)
    astrometryVisitOrder = RangeField("order of the per-visit map (radial, constrained)", int, default=_D.visit_order,
                                      min=1, max=12)
    photometryModel = ChoiceField("photometric model", str, default=_PHOT_MODELS_BY_CORE[_D.photometry_model], allowed={
        "constrainedMagnitude": "per-detector + per-visit, in magnitudes",
        "constrainedFlux": "per-detector + per-visit, in flux",
        "simpleMagnitude": "one scale per detector-visit, in magnitudes",
        "simpleFlux": "one scale per detector-visit, in flux"})
    photometryVisitOrder = RangeField("Chebyshev order of the per-visit photometric field", int,
                                      default=_D.photometry_visit_order, min=0, max=12)
    outlierRejectSigma = RangeField("reject outliers beyond this many sigma", float, default=_D.outlier_sigma,
                                    min=0.0, inclusiveMin=False)
    maxSteps = RangeField("maximum Gauss-Newton steps per stage", int, default=_D.max_iterations, min=1)
    matchCut = RangeField("association radius between detections of one star (arcsec; jointcal's default "
                          "is 3.0, jcal's 1.0)", float, default=_D.match_radius_arcsec, min=0.0, inclusiveMin=False)
    minMeasurements = RangeField("minimum number of points of a fitted star (detections, + its reference star "
                                 "if referenceCounts)", int,
                                 default=_D.min_measurements, min=1)
    astrometryReferenceErr = RangeField("reference position error per coordinate (mas); overrides/supplies "
                                        "the refcat errors", float, default=_D.reference_error_mas, min=0.0,
                                        inclusiveMin=False, optional=True)
    astrometryErrorPedestal = RangeField("added in quadrature to centroid errors (mas)", float,
                                         default=_D.astrometry_pedestal_mas, min=0.0)
    photometryErrorPedestal = RangeField("systematic photometric error added in quadrature: a fraction of the "
                                         "flux for flux models, magnitudes for magnitude models", float,
                                         default=0.0, min=0.0)
    colorterms = Field("colour terms {band: {primary, secondary, c0, c1, c2}} (refcat band names; visits in "
                       "band see mag(primary) + c0 + c1 (primary - secondary) + c2 (...)^2), or an LSST "
                       "ColortermLibrary as a dict {'data': {camera: {'data': {band: {...}}}}} with one camera",
                       dict, default={})
    useLineSearch = Field("line search along each Gauss-Newton step", bool, default=_D.line_search)
    doProperMotion = ChoiceField("fit proper motions", str, default=_D.proper_motion, allowed={
        "auto": "when the visits span more than properMotionMinBaseline years", "on": "always", "off": "never"})
    writeChi2FilesInitialFinal = Field("write per-measurement chi2 contributions of the final fit "
                                       "(astrometry_final-meas.csv; jcal has no separate 'initial' file)",
                                       bool, default=False)
    # jcal extensions (FitConfig fields with no jointcal counterpart)
    refMatchCut = RangeField("[jcal] fitted-star to reference-star match radius (arcsec)", float,
                             default=_D.ref_match_radius_arcsec, min=0.0, inclusiveMin=False)
    properMotionMinBaseline = RangeField("[jcal] doProperMotion='auto' threshold (years)", float,
                                         default=_D.pm_min_baseline_years, min=0.0)
    properMotionPrior = RangeField("[jcal] prior width on non-reference proper motions (mas/yr)", float,
                                   default=_D.pm_prior_mas_yr, min=0.0, inclusiveMin=False)
    convergenceTolerance = RangeField("[jcal] stop when chi2 changes by less than this fraction", float,
                                      default=_D.tolerance, min=0.0, inclusiveMin=False)
    maxOutlierRounds = RangeField("[jcal] maximum outlier-rejection rounds", int, default=_D.max_outlier_rounds,
                                  min=0)
    fitColorterms = Field("[jcal] fit c1 of every band in colorterms (its configured c1 is the start; c0, c2 "
                          "stay fixed)", bool, default=_D.fit_colour_terms)
    fluxErrors = ChoiceField("[jcal] flux models: 'jointcal' ends at jointcal's fixed point (errors held per "
                             "solve), 'minimum' at the minimum of chi2 (unbiased absolute level)", str,
                             default=_D.flux_errors, allowed={"jointcal": "jointcal's fixed point",
                                                          "minimum": "the minimum of chi2"})
    wcsFormat = ChoiceField("[jcal] output FITS WCS files", str, default=_D.wcs_format, allowed={
        "sip": "TAN-SIP in wcs/", "tpv": "TPV (SCAMP) in wcs/", "both": "TAN-SIP in wcs/, TPV in wcs_tpv/"})
    duplicateSources = ChoiceField("[jcal] duplicate detections (same detector-visit and source_id, or x and y)",
                                   str, default=_D.duplicate_detections, allowed=_SCREEN_MODES)
    outsideDetector = ChoiceField("[jcal] detections beyond their detector by more than outsideDetectorMargin",
                                  str, default=_D.outside_detector, allowed=_SCREEN_MODES)
    outsideDetectorMargin = RangeField("[jcal] pixels beyond the detector's bounds tolerated", float,
                                       default=_D.outside_margin_pixels, min=0.0)
    farOffWcs = ChoiceField("[jcal] detector-visits whose first-guess WCS has no reference star and no other "
                            "visit near it", str, default=_D.far_off_wcs, allowed=_SCREEN_MODES)
    referenceCounts = Field("[jcal] a matched reference star counts toward minMeasurements (gbdes); False: "
                            "detections only (jointcal)", bool, default=_D.reference_counts)
    alignRadius = RangeField("[jcal] align visits and detector-visits on the reference catalog from pair offsets "
                             "within this radius (arcsec) before matching; 0: off", float,
                             default=_D.align_radius_arcsec, min=0.0)
    rematchRounds = RangeField("[jcal] after the astrometric fit, associate again through the fitted map and "
                               "refit when its stars would match > 1 % more reference stars, at most this often",
                               int, default=_D.rematch_rounds, min=0)
    photometryDetectorOrder = RangeField("[jcal] order of each detector's own photometric field (constrained "
                                         "models; 0: a constant, jointcal's)", int,
                                         default=_D.photometry_detector_order, min=0, max=12)
    holdoutFraction = RangeField("[jcal] fraction of non-reference stars held out of the astrometric fit to "
                                 "validate it", float, default=_D.holdout_fraction, min=0.0, max=0.5,
                                 inclusiveMax=False)
    # subtasks
    sourceSelector = SourceSelectorTask.makeField("source selection")
    associate = AssociationTask.makeField("association of detections into stars")
    refObjLoader = ReferenceLoaderTask.makeField("reference catalog")
    astrometryFit = AstrometryFitTask.makeField("astrometric fit")
    photometryFit = PhotometryFitTask.makeField("photometric fit")

    def applyOverride(self, key, value):
        """As `Config.applyOverride`; FitConfig (snake_case) names are accepted as aliases (FIELD_MAP)."""
        from .config import parse_value
        if isinstance(value, str):
            value = parse_value(value)
        super().applyOverride(*_translate(key, value))

    def applyDict(self, values, where=""):
        if not where:
            values = dict(_translate(k, v) for k, v in values.items())
            for k in [k for k in values if "." in k]:  # aliases of nested fields
                self.applyOverride(k, values.pop(k))
        super().applyDict(values, where)

    def validate(self) -> None:
        super().validate()
        if not (self.doAstrometry or self.doPhotometry):
            raise FieldValidationError("config fields 'doAstrometry'/'doPhotometry': at least one must be True")
        self.toFitConfig()

    def toFitConfig(self) -> FitConfig:
        """The core's `FitConfig` for this config (FIELD_MAP)."""
        flux = self.photometryModel.endswith("Flux")
        try:
            return FitConfig(
                astrometry=self.doAstrometry, photometry=self.doPhotometry,
                min_snr=self.sourceSelector.signalToNoiseMin, match_radius_arcsec=self.matchCut,
                ref_match_radius_arcsec=self.refMatchCut, min_measurements=self.minMeasurements,
                astrometry_model=self.astrometryModel, chip_order=self.astrometryChipOrder,
                visit_order=self.astrometryVisitOrder, simple_order=self.astrometrySimpleOrder,
                proper_motion=self.doProperMotion, pm_min_baseline_years=self.properMotionMinBaseline,
                pm_prior_mas_yr=self.properMotionPrior, reference_error_mas=self.astrometryReferenceErr,
                astrometry_pedestal_mas=self.astrometryErrorPedestal,
                photometry_model=_PHOT_MODELS[self.photometryModel],
                photometry_visit_order=self.photometryVisitOrder,
                flux_pedestal=self.photometryErrorPedestal if flux else 0.0,
                magnitude_pedestal=0.0 if flux else self.photometryErrorPedestal,
                reference_band=self.refObjLoader.anyFilterMapsToThis,
                outlier_sigma=self.outlierRejectSigma, max_iterations=self.maxSteps,
                tolerance=self.convergenceTolerance, line_search=self.useLineSearch,
                max_outlier_rounds=self.maxOutlierRounds, colour_terms=colour_terms_from_library(self.colorterms),
                fit_colour_terms=self.fitColorterms, flux_errors=self.fluxErrors, wcs_format=self.wcsFormat,
                duplicate_detections=self.duplicateSources, outside_detector=self.outsideDetector,
                outside_margin_pixels=self.outsideDetectorMargin, far_off_wcs=self.farOffWcs,
                reference_counts=self.referenceCounts, align_radius_arcsec=self.alignRadius,
                rematch_rounds=self.rematchRounds,
                photometry_detector_order=self.photometryDetectorOrder, holdout_fraction=self.holdoutFraction)
        except ConfigError as exc:
            raise FieldValidationError(f"{exc} (FitConfig field; see jcal.task.FIELD_MAP for the jointcal name)") \
                from exc


def colour_terms_from_library(value: dict) -> dict:
    """FitConfig.colour_terms from `colorterms`: either already {band: {primary, secondary, c0, c1, c2}},
    or an LSST ColortermLibrary saved as a dict, {"data": {camera glob: {"data": {band: {...}}}}},
    of which the one camera entry is taken (several: FieldValidationError, the camera is not known here)."""
    if set(value) != {"data"} or not isinstance(value["data"], dict):
        return value
    cameras = value["data"]
    if len(cameras) != 1:
        raise FieldValidationError(f"config field 'colorterms': a ColortermLibrary with {len(cameras)} camera "
                                   f"entries {sorted(cameras)}; keep the one for this data")
    (entry,) = cameras.values()
    return entry.get("data", entry) if isinstance(entry, dict) else entry


# FitConfig field -> JointcalConfig (dotted) field; also accepted as override keys (README's `--set visit_order=3`).
FIELD_MAP = {
    "astrometry": "doAstrometry", "photometry": "doPhotometry", "min_snr": "sourceSelector.signalToNoiseMin",
    "match_radius_arcsec": "matchCut", "ref_match_radius_arcsec": "refMatchCut",
    "min_measurements": "minMeasurements", "astrometry_model": "astrometryModel",
    "chip_order": "astrometryChipOrder", "visit_order": "astrometryVisitOrder",
    "simple_order": "astrometrySimpleOrder", "proper_motion": "doProperMotion",
    "pm_min_baseline_years": "properMotionMinBaseline", "pm_prior_mas_yr": "properMotionPrior",
    "reference_error_mas": "astrometryReferenceErr", "astrometry_pedestal_mas": "astrometryErrorPedestal",
    "photometry_model": "photometryModel", "photometry_visit_order": "photometryVisitOrder",
    "flux_pedestal": "photometryErrorPedestal", "magnitude_pedestal": "photometryErrorPedestal",
    "reference_band": "refObjLoader.anyFilterMapsToThis", "outlier_sigma": "outlierRejectSigma",
    "max_iterations": "maxSteps", "tolerance": "convergenceTolerance", "line_search": "useLineSearch",
    "max_outlier_rounds": "maxOutlierRounds", "colour_terms": "colorterms", "fit_colour_terms": "fitColorterms",
    "flux_errors": "fluxErrors", "wcs_format": "wcsFormat", "duplicate_detections": "duplicateSources",
    "outside_detector": "outsideDetector", "outside_margin_pixels": "outsideDetectorMargin", "far_off_wcs": "farOffWcs",
    "flux_errors": "fluxErrors", "reference_counts": "referenceCounts", "align_radius_arcsec": "alignRadius",
    "photometry_detector_order": "photometryDetectorOrder", "holdout_fraction": "holdoutFraction",
    "rematch_rounds": "rematchRounds",
}
_PHOT_MODELS_BACK = {v: k for k, v in _PHOT_MODELS.items()}


def _translate(key: str, value):
    """Accept FitConfig (snake_case) names as aliases of the jointcal names."""
    if key in FIELD_MAP:
        if key == "photometry_model" and value in _PHOT_MODELS_BACK:
            value = _PHOT_MODELS_BACK[value]
        return FIELD_MAP[key], value
    return key, value


# ------------------------------------------------------------------------------------------ task
class _WcsHeaders(Mapping):
    """{(visit, detector): astropy FITS header} of a fit, all fitted at the first access."""

    def __init__(self, result, kind: str):
        self._result, self._kind, self._headers = result, kind, None

    def _all(self) -> dict:
        if self._headers is None:
            from astropy.io import fits
            self._headers = {k: fits.Header(c) for k, (c, _) in self._result.wcs_cards(kind=self._kind).items()}
        return self._headers

    def __getitem__(self, key):
        return self._all()[tuple(int(k) for k in key)]

    def __iter__(self):
        return iter(tuple(k) for k in self._result.association.ccd_visits.tolist())

    def __len__(self):
        return len(self._result.association.ccd_visits)


def package_versions() -> dict[str, str]:
    out = {}
    for pkg in ("jcal", "jax", "jaxlib", "numpy", "astropy", "pyarrow"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    out["python"] = sys.version.split()[0]
    import jax
    out["jax_backend"] = jax.default_backend()
    out["jax_devices"] = ", ".join(str(d) for d in jax.devices())
    return out


def _schema_dict(schema) -> dict[str, str]:
    return {f.name: str(f.type) for f in schema}


class JointcalTask(Task):
    """Joint astrometric and photometric calibration, with jointcal's Task handles."""

    ConfigClass = JointcalConfig
    _DefaultName = "jointcal"
    RunnerClass = None

    def __init__(self, config: JointcalConfig | None = None, name: str | None = None,
                 parentTask: Task | None = None, **kwargs):
        super().__init__(config=config, name=name, parentTask=parentTask, **kwargs)
        self.config.validate()
        for sub in ("sourceSelector", "associate", "refObjLoader", "astrometryFit", "photometryFit"):
            self.makeSubtask(sub)
        self._schemas: dict[str, Any] = {}

    @classmethod
    def applyOverrides(cls, config: JointcalConfig) -> None:
        """Hook run by `parseAndRun` before file and --set overrides (default: nothing)."""

    # -- processing ---------------------------------------------------------------------------------
    @timeMethod
    def run(self, data: InputData, *, astrometry_model=None, mapping_filter=None, progress=None) -> Struct:
        """Fit `data`; Struct(wcsHeaders, photoCalibs, stars, metrics, fitResult, oldWcsList)."""
        with capture_warnings([]) as warnings:
            struct = self._run(data, astrometry_model, mapping_filter, progress)
        struct.fitResult.warnings.extend(warnings)
        struct.metrics["warnings"] = list(struct.fitResult.warnings)
        return struct

    def _run(self, data, astrometry_model, mapping_filter, progress) -> Struct:
        from ..jax_setup import ensure_configured
        from ..result import FitResult
        ensure_configured()
        c = self.config
        fitConfig = c.toFitConfig()
        from ..screen import screen_input
        data, screening = screen_input(data, fitConfig)
        sel = self.sourceSelector.run(data.sources)
        if not sel.selected.all():
            data = dataclasses.replace(data, sources=sel.sourceCat)
        self.refObjLoader.run(data)
        timings: dict[str, float] = {}
        with self.timer("associate"), step(progress, "associating detections"):
            assoc = self.associate.run(data, fitConfig)
        result = FitResult(data, fitConfig, assoc, timings=timings, input_screening=screening)
        if c.doAstrometry:
            with step(progress, "astrometric fit"):
                result.astrometry = self.astrometryFit.run(data, assoc, fitConfig, model=astrometry_model,
                                                           mapping_filter=mapping_filter, progress=progress)
            assoc = result.association = result.astrometry.association  # re-associated if it matched more
        if c.doPhotometry:
            with step(progress, "photometric fit"):
                result.photometry = self.photometryFit.run(data, assoc, fitConfig, astrometry=result.astrometry,
                                                           progress=progress)
        for sub in ("associate", "astrometryFit", "photometryFit"):
            md = getattr(self, sub).metadata
            if "runStartWallTime" in md and "runEndWallTime" in md:
                timings[sub] = md["runEndWallTime"] - md["runStartWallTime"]
        metrics = result.metrics
        for k, v in metrics.items():
            if isinstance(v, (int, float, bool, str)):
                self.metadata["metrics." + k] = v
        # computed on first use, in one batched fit (the command line writes them, it never asks)
        wcs = _WcsHeaders(result, "tpv" if c.wcsFormat == "tpv" else "sip") if result.astrometry is not None else {}
        import pyarrow as pa
        self._schemas = {"measurements": pa.table({k: np.asarray(v) for k, v in result.measurement_table().items()}).schema,
                         "stars": pa.table({k: np.asarray(v) for k, v in result.star_table().items()}).schema}
        return Struct(wcsHeaders=wcs, photoCalibs=result.photometry, stars=result.star_table(), metrics=metrics,
                      fitResult=result, oldWcsList={k: cv.wcs for k, cv in data.ccd_visits.items()
                                                   if hasattr(cv, "wcs")})

    def readInputs(self, input_dir, *, lsst: bool = False, flux_type: str = "apFlux_12_0") -> InputData:
        """jcal's input directory (`jcal.read_input`) or LSST outputs (`jcal.io.lsst.read_lsst`: a
        folder, or an `LsstPaths` of files or in-memory objects; `flux_type` is jointcal's sourceFluxType)."""
        with self.timer("readInputs"):
            if lsst:
                from ..io.lsst import read_lsst
                return read_lsst(input_dir, reference_error_mas=self.config.astrometryReferenceErr,
                                 flux_type=flux_type, selection=self.sourceSelector.lsst_selection()).data
            from ..io import read_input
            return read_input(input_dir)

    def loadData(self, dataRefs, associations=None, jointcalControl=None) -> InputData:
        """Legacy (Gen2) input: the data of `dataRefs`, objects with ``.dataId`` and ``.get(datasetType)``
        (`jcal.io.lsst_objects.lsst_paths_from_datarefs` says which dataset types). jcal builds its
        own associations, so `associations`/`jointcalControl` (jointcal's C++ objects) must be None."""
        if associations is not None or jointcalControl is not None:
            raise TaskError("loadData: jcal builds its own associations; pass dataRefs only")
        from ..io.lsst_objects import lsst_paths_from_datarefs
        return self.readInputs(lsst_paths_from_datarefs(dataRefs), lsst=True)

    @timeMethod
    def runDataRef(self, dataRefs) -> Struct:
        """Legacy (Gen2) entry, as jointcal's: fit the exposures of `dataRefs` (see `loadData`).

        Returns `run`'s Struct plus ``dataRefs``; ``wcsHeaders``/``photoCalibs`` hold the updated
        calibrations, ``oldWcsList`` the first guesses, ``metrics`` the metrics. The Rubin
        middleware's entry is ``jcal.rubin.JcalPipelineTask.runQuantum``.
        """
        struct = self.run(self.loadData(dataRefs))
        struct.dataRefs = list(dataRefs)
        return struct

    @timeMethod
    def runDirectory(self, input_dir, output_dir, *, clobber: bool = False, doBackup: bool = True,
                     lsst: bool = False, progress=None, report: bool = False) -> Struct:
        """runDataRef/runQuantum equivalent: read `input_dir`, run, write everything to `output_dir`.

        Every output file (the fit's, config, metadata, package versions, schemas, the chi2 file
        and, with `report`, the diagnostic report) is written into one temporary folder that
        becomes `output_dir` in one atomic rename (`jcal.io.atomic_output_dir`): a kill at any
        moment leaves the previous state or a complete output. An existing `output_dir` raises
        `OutputExistsError` unless clobber=True, which replaces a previous jcal output only (never
        the input, nor a folder holding files jcal did not write). `doBackup` is accepted for
        jointcal's signature: a fresh folder holds no older config to back up.
        """
        from ..io.atomic import atomic_output_dir, check_target, overwrite_hint
        with overwrite_hint("clobber=True"):
            check_target(output_dir, clobber, protect=[input_dir])  # fail before the fit, not after it
            with step(progress, f"reading {input_dir}"):
                data = self.readInputs(input_dir, lsst=lsst)
            struct = self.run(data, progress=progress)
            result = struct.fitResult
            with self.timer("writeOutputs"), \
                    atomic_output_dir(output_dir, overwrite=clobber, protect=[input_dir]) as tmp:
                with step(progress, f"writing {output_dir}", total=len(result.association.ccd_visits)) as update:
                    result.write_files(tmp, progress=update)
                if self.config.writeChi2FilesInitialFinal and result.astrometry is not None:
                    self._writeChi2(result, tmp)
                self.writeConfig(tmp)
                self.writePackageVersions(tmp)
                self.writeSchemas(tmp)
                self.writeMetadata(tmp)
                if report:
                    from ..report import make_report
                    with step(progress, "writing the report"):
                        make_report(tmp, shown_as=Path(output_dir))
        struct.outputDir = Path(output_dir)
        return struct

    def _writeChi2(self, result, out: Path) -> None:
        import pyarrow as pa
        import pyarrow.csv as pacsv
        m = result.measurement_table()
        cols = {k: np.asarray(m[k]) for k in ("source_id", "visit", "detector", "star", "chi2", "outlier") if k in m}
        pacsv.write_csv(pa.table(cols), out / "astrometry_final-meas.csv")

    # -- writes -------------------------------------------------------------------------------------
    def _configName(self) -> str:
        return f"{self.getName()}_config.json"

    def _metadataName(self) -> str:
        return f"{self.getName()}_metadata.json"

    def writeConfig(self, output_dir, clobber: bool = False, doBackup: bool = True) -> Path:
        """Write `<name>_config.json`, or check an existing one is equal (TaskError if not, unless clobber)."""
        return write_checked(Path(output_dir) / self._configName(),
                             json.loads(self.config.toJson()), clobber=clobber, doBackup=doBackup,
                             what="config")

    def writeMetadata(self, output_dir) -> Path:
        """Write the full metadata (`getFullMetadata`) as `<name>_metadata.json` (replaced each run)."""
        return write_checked(Path(output_dir) / self._metadataName(), self.getFullMetadata().to_dict(),
                             clobber=True, doBackup=False, what="metadata")

    def writePackageVersions(self, output_dir, clobber: bool = False, doBackup: bool = True,
                             dataset: str = "packages") -> Path:
        """Write `<dataset>.json`; an existing file with different versions of common packages raises
        (unless clobber); new packages are merged in."""
        path = Path(output_dir) / f"{dataset}.json"
        new = package_versions()
        if path.exists() and not clobber:
            old = json.loads(path.read_text())
            diff = {k: (old[k], new[k]) for k in set(old) & set(new) if old[k] != new[k]}
            if diff:
                raise TaskError(f"package versions differ from {str(path)!r} (old, new): {diff}; "
                                "pass clobber=True to replace")
            if set(new) <= set(old):
                return path
            new = {**old, **new}
            return write_checked(path, new, clobber=True, doBackup=doBackup, what="packages")
        return write_checked(path, new, clobber=clobber, doBackup=doBackup, what="packages")

    def getSchemaCatalogs(self) -> dict[str, Any]:
        """{"measurements"/"stars": empty pyarrow table with the output schema}, known after `run`."""
        return {k: s.empty_table() for k, s in self._schemas.items()}

    def writeSchemas(self, output_dir, clobber: bool = False, doBackup: bool = True) -> list[Path]:
        """Write `<table>_schema.json` (column -> arrow type) for every table of `getAllSchemaCatalogs`."""
        cats = self.getAllSchemaCatalogs()
        if not cats:
            raise TaskError("writeSchemas: no schema yet (the output tables' columns are known after run())")
        return [write_checked(Path(output_dir) / f"{k}_schema.json", _schema_dict(t.schema), clobber=clobber,
                              doBackup=doBackup, what=f"{k} schema") for k, t in cats.items()]

    # -- command line -------------------------------------------------------------------------------
    @classmethod
    def makeArgumentParser(cls) -> argparse.ArgumentParser:
        from ..cli import fit_argument_parser  # defined there: `jcal fit --help` imports no fitting code
        return fit_argument_parser()

    @classmethod
    def parseAndRun(cls, args=None, config=None, log=None, doReturnResults=False) -> Struct:
        """Parse `args` (default sys.argv[1:]), build the config, run `runDirectory`.

        Struct(argumentParser, parsedCmd, taskRunner=None, resultList=[Struct(exitStatus, result?)],
        exitStatus, config).
        """
        parser = cls.makeArgumentParser()
        parsed = parser.parse_args(sys.argv[1:] if args is None else list(args))
        config = config if config is not None else cls.ConfigClass()
        cls.applyOverrides(config)
        for path in parsed.config or []:
            config.load(path)
        config.applyOverrides(parsed.set)
        if parsed.no_astrometry:
            config.doAstrometry = False
        if parsed.no_photometry:
            config.doPhotometry = False
        if getattr(parsed, "wcs_format", None):
            config.wcsFormat = parsed.wcs_format
        out = Struct(argumentParser=parser, parsedCmd=parsed, taskRunner=None, resultList=[], config=config)
        if parsed.show_config:
            print(config.describe())
            out.exitStatus = 0
            return out
        if not parsed.input or not parsed.out:
            parser.error("input and --out are required (unless --show-config)")
        config.validate()
        config.freeze()
        task = cls(config=config, log=log)
        out.task = task
        status = 0
        progress = Progress(enabled=not parsed.quiet)
        from ..io.atomic import overwrite_hint
        try:
            with overwrite_hint("--overwrite"):
                res = task.runDirectory(parsed.input, parsed.out, clobber=parsed.overwrite,
                                        doBackup=not parsed.no_backup_config, lsst=parsed.lsst, progress=progress,
                                        report=parsed.report)
        except Exception as exc:
            if parsed.doraise:
                raise
            task.log.error("failed: %s: %s", type(exc).__name__, exc)
            status, res = 1, None
        if res is not None:
            if not parsed.quiet:
                m = res.metrics
                for key in ("astrometry_final_chi2", "astrometry_final_ndof", "astrometry_outliers",
                            "photometry_final_chi2", "photometry_final_ndof"):
                    if key in m:
                        print(f"{key}: {m[key]}")
                print(task.timingTable())
                print(f"wrote {parsed.out}")
                report = Path(parsed.out) / "report" / "index.html"
                print(f"next: open {report} in a browser" if parsed.report else
                      f"next: jcal report {parsed.out}   (then open {report})")
        entry = Struct(exitStatus=status)
        if doReturnResults:
            entry.result = res
        out.resultList.append(entry)
        out.exitStatus = status
        return out

    def timingTable(self) -> str:
        rows = timing_table(self.getFullMetadata())
        lines = [f"{'task.item':<40} {'wall s':>9} {'cpu s':>9} {'maxRSS MB':>10}"]
        lines += [f"{n:<40} {w:9.3f} {c:9.3f} {m:10.1f}" for n, w, c, m in rows]
        return "\n".join(lines)
