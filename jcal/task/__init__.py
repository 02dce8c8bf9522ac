"""Task facade: lsst.jointcal.JointcalTask's handles (config, metadata, timing, subtasks, run) over jcal.

    from jcal.task import JointcalTask, JointcalConfig
    config = JointcalConfig()
    config.astrometryVisitOrder = 3
    config.doPhotometry = False
    task = JointcalTask(config=config)
    struct = task.run(data)                    # data: jcal.InputData
    struct.wcsHeaders[(visit, detector)]       # fitted TAN-SIP FITS headers
    task.runDirectory("in/", "out/")           # read, run, write (runDataRef/runQuantum equivalent)
    JointcalTask.parseAndRun(["in/", "--out", "out/", "--set", "astrometryVisitOrder=3"])

Config: `jcal.task.config` is a small pex_config-like system (Field, ChoiceField, RangeField,
ListField, ConfigurableField; `freeze`, equality, JSON `save`/`load`, dotted overrides).
`JointcalConfig` uses jointcal's field names and maps onto `jcal.FitConfig`
(`JointcalConfig.toFitConfig`, table `FIELD_MAP`; FitConfig's snake_case names are accepted as
override aliases). Subtasks: sourceSelector, associate, refObjLoader, astrometryFit,
photometryFit — each retargetable: ``config.astrometryFit.retarget(MyTask)``.

Mapping of the lsst.jointcal.JointcalTask API page:

=============================  ==============================================================
LSST JointcalTask              jcal.task.JointcalTask
=============================  ==============================================================
JointcalTask(butler, ...)      JointcalTask(config=None, name=None, parentTask=None, log=None)
canMultiprocess                canMultiprocess (False: one process; JAX parallelises inside)
applyOverrides(config)         applyOverrides(config) classmethod hook, called by parseAndRun
emptyMetadata()                emptyMetadata()
getAllSchemaCatalogs()         getAllSchemaCatalogs(): {table: empty pyarrow Table}
getSchemaCatalogs()            getSchemaCatalogs(); output columns depend on the fitted models,
                               so schemas are known after run() (empty dict before)
getFullMetadata()              getFullMetadata(): TaskMetadata keyed "jointcal:astrometryFit"
getFullName() / getName()      same
getResourceConfig()            same (None)
getTaskDict()                  same ({full name: weakref to task})
loadData(dataRefs, ...) (gen2) loadData(dataRefs): Gen2-style references (.dataId, .get); also
                               readInputs(input_dir, lsst=False): jcal.read_input / read_lsst
makeField(doc)                 makeField(doc) classmethod -> ConfigurableField
makeSubtask(name, **kw)        same
parseAndRun(args, config, log, same; args are `jcal fit`'s (input --out DIR --set k=v
  doReturnResults)               --config FILE --show-config ...); returns Struct(argumentParser,
                               parsedCmd, taskRunner=None, resultList=[Struct(exitStatus,
                               result)], exitStatus)
run(inputSourceTableVisit,     run(data: jcal.InputData) -> Struct(wcsHeaders, photoCalibs,
  inputVisitSummary, camera)     stars, metrics, fitResult, oldWcsList)
runDataRef(dataRefs) (gen2)    runDataRef(dataRefs) (legacy path; Struct as run's + dataRefs);
                               runDirectory(input_dir, output_dir, clobber=False, doBackup=True,
                                 lsst=False): a directory in place of a butler
runQuantum(butlerQC, ...)      jcal.rubin.JcalPipelineTask.runQuantum (a real PipelineTask;
                                 pip install -e ".[rubin]"; docs/rubin.md)
timer(name, logLevel)          same (context manager; metadata items nameStart*/nameEnd*)
@timeMethod                    jcal.task.timeMethod
writeConfig(butler, clobber,   writeConfig(output_dir, clobber=False, doBackup=True)
  doBackup)                      -> <name>_config.json
writeMetadata(dataRef)         writeMetadata(output_dir) -> <name>_metadata.json
writePackageVersions(butler,   writePackageVersions(output_dir, clobber=False, doBackup=True,
  clobber, doBackup, dataset)    dataset="packages") -> packages.json (jcal, jax, jaxlib, numpy,
                               astropy, pyarrow, python, jax backend and devices)
writeSchemas(butler, clobber,  writeSchemas(output_dir, clobber=False, doBackup=True)
  doBackup)                      -> <table>_schema.json (column -> arrow type)
=============================  ==============================================================

clobber/doBackup: an existing file equal to the new one is left alone; a different one raises
`TaskError` when clobber=False; with clobber=True it is replaced, the old one first renamed to
``<file>~N`` when doBackup=True. Nothing is overwritten silently.

``colorterms`` maps to FitConfig.colour_terms (``{band: {primary, secondary, c0, c1, c2}}``, or an
LSST ColortermLibrary dict with one camera entry) and jcal's ``fitColorterms`` to
``fit_colour_terms`` (fit c1 per band); see `jcal.calibration.photometry`.
Not applied: ``badFlags``/``isolated``/``unresolved`` act only when reading LSST tables (jcal's
input format has no flags). ``writeChi2FilesInitialFinal`` writes the final per-measurement chi2
only. Defaults follow jcal's FitConfig (jointcal's ``matchCut`` default is 3 arcsec, jcal's 1).
"""

from .base import Struct, Task, TaskError
from .config import (ChoiceField, Config, ConfigurableField, Field, FieldValidationError, FrozenConfigError,
                     ListField, RangeField)
from .jointcal import (FIELD_MAP, AssociationTask, AstrometryFitTask, JointcalConfig, JointcalTask,
                       PhotometryFitTask, ReferenceLoaderTask, SourceSelectorConfig, SourceSelectorTask,
                       package_versions)
from .metadata import TaskMetadata
from .timing import logInfo, timeMethod

__all__ = ["AssociationTask", "AstrometryFitTask", "ChoiceField", "Config", "ConfigurableField", "FIELD_MAP",
           "Field", "FieldValidationError", "FrozenConfigError", "JointcalConfig", "JointcalTask", "ListField",
           "PhotometryFitTask", "RangeField", "ReferenceLoaderTask", "SourceSelectorConfig", "SourceSelectorTask",
           "Struct", "Task", "TaskError", "TaskMetadata", "logInfo", "package_versions", "timeMethod"]
