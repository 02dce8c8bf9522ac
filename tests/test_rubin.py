"""jcal in the Rubin middleware (jcal.rubin, docs/rubin.md) and the legacy Gen2 entry runDataRef.

The middleware tests skip only when ``lsst.pipe.base`` is not importable (``pip install -e
".[rubin]"``; CI installs it). The expected metrics are jointcal's own on cfht_minimal.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from astropy.io import fits

from jcal.io.lsst_objects import hdulist_from_bytes
from jcal.task import JointcalConfig, JointcalTask, TaskError

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data" / "cfht_minimal"
CONFIG = ROOT / "configs" / "jointcal_cfht_minimal.json"
HAVE_MIDDLEWARE = importlib.util.find_spec("lsst") is not None and \
    importlib.util.find_spec("lsst.pipe.base") is not None
needs_middleware = pytest.mark.skipif(not HAVE_MIDDLEWARE, reason="lsst.pipe.base not installed (.[rubin] extra)")
JOINTCAL = {"photometry_final_chi2": 2.336915, "photometry_final_ndof": 1, "photometry_prepared_ccdImages": 2,
            "photometry_collected_refStars": 346, "photometry_prepared_fittedStars": 2}

# Every method of lsst.jointcal.JointcalTask's API page, and where jcal has it.
SEED_API = {
    "facade": ["applyOverrides", "emptyMetadata", "getAllSchemaCatalogs", "getFullMetadata", "getFullName",
               "getName", "getResourceConfig", "getSchemaCatalogs", "getTaskDict", "loadData", "makeField",
               "makeSubtask", "parseAndRun", "run", "runDataRef", "timer", "writeConfig", "writeMetadata",
               "writePackageVersions", "writeSchemas", "canMultiprocess"],
    "pipeline": ["emptyMetadata", "getAllSchemaCatalogs", "getFullMetadata", "getFullName", "getName",
                 "getSchemaCatalogs", "getTaskDict", "makeField", "makeSubtask", "run", "runQuantum", "timer"],
}


def _check_metrics(m: dict) -> None:
    for key, want in JOINTCAL.items():
        if isinstance(want, float):
            assert f"{m[key]:.7g}" == f"{want:.7g}", key
        else:
            assert m[key] == want, key


def test_jcal_never_imports_lsst(tmp_path):
    """`import jcal` and `jcal fit --lsst` run without importing any lsst.* module."""
    code = ("import sys, jcal\nfrom jcal.cli import main\n"
            f"assert main(['fit', {str(DATA)!r}, '--lsst', '--config', {str(CONFIG)!r}, '--set', "
            f"'photometryModel=simpleFlux', '--out', {str(tmp_path / 'out')!r}, '--quiet']) == 0\n"
            "bad = sorted(m for m in sys.modules if m == 'lsst' or m.startswith('lsst.'))\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "OPENBLAS_NUM_THREADS": "1"})


class _AfwLikeCatalog:
    """Stands in for an afw ExposureCatalog: all jcal uses of one is ``writeFits``."""

    def __init__(self, path: Path):
        self.path = path

    def writeFits(self, name: str) -> None:
        Path(name).write_bytes(self.path.read_bytes())


class _DataRef:
    """A Gen2-style data reference over the cfht_minimal files, handing over in-memory objects."""

    def __init__(self, visit: int, detector: int):
        self.dataId = {"visit": visit, "detector": detector}

    def get(self, datasetType: str):
        v, d = self.dataId["visit"], self.dataId["detector"]
        if datasetType == "sourceTable":
            return pq.read_table(DATA / "sources" / f"{v}_{d}.parquet").drop_columns(["visit", "detector"])
        if datasetType == "visitSummary":
            path = DATA / "visitSummary" / f"{v}.fits"
            # one visit as an HDUList, the other as an afw-like catalog (writes itself as FITS)
            return hdulist_from_bytes(path.read_bytes()) if v == 849375 else _AfwLikeCatalog(path)
        if datasetType == "refcat":
            return DATA / "refcat" / "sdss-dr9-fink-v5b"
        raise KeyError(datasetType)


def test_runDataRef_legacy_gen2_path():
    config = JointcalConfig.fromFile(CONFIG)
    config.photometryModel = "simpleFlux"
    task = JointcalTask(config=config)
    refs = [_DataRef(849375, 12), _DataRef(850587, 12)]
    struct = task.runDataRef(refs)
    assert struct.dataRefs == refs
    assert set(struct.oldWcsList) == {(849375, 12), (850587, 12)}
    _check_metrics(struct.metrics)
    with pytest.raises(TaskError, match="associations"):
        task.loadData(refs, associations=object())


def test_seed_api_methods_exist():
    for name in SEED_API["facade"]:
        assert hasattr(JointcalTask, name), name
    if HAVE_MIDDLEWARE:
        from jcal.rubin import JcalPipelineTask
        for name in SEED_API["pipeline"]:
            assert callable(getattr(JcalPipelineTask, name, None)), name


@needs_middleware
def test_pex_config_mirrors_the_facade_config():
    from lsst.pex.config import FieldValidationError as PexError

    from jcal.rubin import JcalPipelineConfig
    pex, jc = JcalPipelineConfig(), JointcalConfig()
    assert pex.toJointcalConfig() == jc  # same fields, same defaults
    for name in jc.keys():
        assert name in pex, name
    pex.sourceSelector.signalToNoiseMin = 20.0
    pex.colorterms = json.dumps({"r": {"primary": "r", "secondary": "i", "c0": 0.0, "c1": 0.1, "c2": 0.0}})
    assert pex.toJointcalConfig().sourceSelector.signalToNoiseMin == 20.0
    assert pex.toJointcalConfig().toFitConfig().colour_terms["r"]["c1"] == 0.1
    with pytest.raises(PexError):
        pex.photometryModel = "noSuchModel"
    pex.doAstrometry = pex.doPhotometry = False
    with pytest.raises(Exception, match="doAstrometry"):
        pex.validate()


@needs_middleware
def test_override_file_is_the_json_config():
    """examples/rubin/cfht_minimal_overrides.py + -c photometryModel=simpleFlux == configs/jointcal_cfht_minimal.json."""
    from jcal.rubin import JcalPipelineConfig
    pex = JcalPipelineConfig()
    pex.load(str(ROOT / "examples" / "rubin" / "cfht_minimal_overrides.py"))  # our own file: pex executes it
    pex.photometryModel = "simpleFlux"
    assert pex.toJointcalConfig() == JointcalConfig.fromFile(CONFIG)


def _env():
    return {**os.environ, "OPENBLAS_NUM_THREADS": "1",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


@needs_middleware
def test_run_cfht_minimal_script(tmp_path):
    work = tmp_path / "work"
    out = subprocess.run(["bash", str(ROOT / "examples" / "rubin" / "run_cfht_minimal.sh"), str(work)],
                         env={**_env(), "PYTHON": sys.executable}, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    m = json.loads((work / "metrics.json").read_text())
    _check_metrics(m)
    assert m["dataId"]["tract"] == 0 and m["dataId"]["physical_filter"] == "r.MP9601"
    assert '"photometry_final_chi2": 2.33691' in out.stdout  # printed too


@needs_middleware
def test_two_tracts_run_as_parallel_quanta(tmp_path):
    """The same data as two tracts: two independent quanta, executed by `pipetask run -j 2`."""
    from lsst.daf.butler import Butler, Config

    from jcal.rubin.repo import ingest_lsst_folder, read_metrics
    from jcal.rubin.storage import SEED_CONFIG
    repo = tmp_path / "repo"
    Butler.makeRepo(str(repo), config=Config(str(SEED_CONFIG)))
    ingest_lsst_folder(repo, DATA, tracts=[0, 1])
    cmd = ["pipetask", "run", "-j", "2", "--register-dataset-types", "-b", str(repo), "-i", "jcal/inputs",
           "-o", "jcal/two", "-p", str(ROOT / "pipelines" / "jcal.yaml"),
           "-C", f"jcal:{ROOT / 'examples' / 'rubin' / 'cfht_minimal_overrides.py'}",
           "-c", "jcal:photometryModel=simpleFlux"]
    out = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "Executed 2 quanta successfully" in out.stdout + out.stderr
    metrics = read_metrics(repo, "jcal/two")
    assert sorted(m["dataId"]["tract"] for m in metrics) == [0, 1]
    for m in metrics:
        _check_metrics(m)
    butler = Butler.from_config(str(repo), collections="jcal/two")
    cal = butler.get("jcalPhotoCalibCatalog", instrument="MegaPrime", visit=849375, skymap="jcal_skymap", tract=1)
    assert list(cal["detector"]) == [12] and 0.4 < cal["calib_mean"][0] < 0.7  # nJy/count (first guess 0.543)
    stars = butler.get("jcalFittedStars", instrument="MegaPrime", skymap="jcal_skymap", tract=0,
                       physical_filter="r.MP9601")
    assert len(stars) == 2


@needs_middleware
def test_output_tables_carry_the_fitted_wcs_and_calibration():
    """The butler outputs of a fit with astrometry (a simulated survey: cfht_minimal cannot fit a WCS)."""
    import jcal
    from astropy.wcs import WCS

    from jcal.rubin.task import output_tables
    sim = jcal.simulate("tiny", seed=1)
    config = JointcalConfig()
    config.astrometryVisitOrder = 2
    config.photometryModel = "simpleFlux"
    struct = JointcalTask(config=config).run(sim.data)
    out = output_tables(struct, tract=7)
    assert out.outputMetrics["tract"] == 7 and set(out.outputWcs) == set(out.outputPhotoCalib)
    visit = min(out.outputWcs)
    wcs_table = out.outputWcs[visit]
    det = int(wcs_table["detector"][0])
    wcs = WCS(fits.Header.fromstring(wcs_table["header"][0], sep="\n"))
    ra, dec = wcs.all_pix2world([100.0], [200.0], 0)
    fra, fdec = struct.fitResult.pixel_to_sky(visit, det, [100.0], [200.0])
    assert abs((ra[0] - fra[0]) * np.cos(np.radians(dec[0]))) * 3.6e6 < 5 and abs(dec[0] - fdec[0]) * 3.6e6 < 5  # mas
    cal = out.outputPhotoCalib[visit]
    assert list(cal["detector"]) == sorted(cal["detector"]) and np.all(cal["calib_mean"] > 0)
    assert len(out.outputStars) == len(struct.stars["star"])
