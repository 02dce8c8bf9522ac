"""jcal.task: the JointcalTask facade (config system, metadata, timing, subtasks, writes, CLI)."""

import json
import logging
import weakref

import pytest

import jcal
from jcal.cli import main
from jcal.task import (ChoiceField, Config, ConfigurableField, Field, FieldValidationError, FrozenConfigError,
                       JointcalConfig, JointcalTask, ListField, RangeField, Struct, Task, TaskError,
                       TaskMetadata, timeMethod)
from jcal.task.jointcal import AstrometryFitTask

FAST = ["--set", "astrometryVisitOrder=3", "--no-photometry", "--quiet"]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """One real (tiny) fit through parseAndRun, shared by the tests below."""
    root = tmp_path_factory.mktemp("task")
    jcal.write_simulation(jcal.simulate("tiny"), root / "in")
    res = JointcalTask.parseAndRun([str(root / "in"), "--out", str(root / "out"), *FAST, "--doraise"],
                                   doReturnResults=True)
    return root, res


# -- config ---------------------------------------------------------------------------------------
def test_bad_values_name_field_and_allowed():
    c = JointcalConfig()
    with pytest.raises(FieldValidationError, match=r"'astrometryModel'.*\['radial', 'constrained', 'simple'\]"):
        c.astrometryModel = "fancy"
    with pytest.raises(FieldValidationError, match=r"'astrometryVisitOrder'.*\[1, 12\]"):
        c.astrometryVisitOrder = 0
    with pytest.raises(FieldValidationError, match="'doAstrometry'.*bool"):
        c.doAstrometry = "yes"
    with pytest.raises(FieldValidationError, match="'badFlags'.*list of str"):
        c.sourceSelector.badFlags = "flag"
    with pytest.raises(FieldValidationError, match="'photometryModel'.*constrainedFlux"):
        c.applyOverride("photometryModel", "magic")
    with pytest.raises(AttributeError, match="no config field 'visitOrder'"):
        c.visitOrder = 3
    with pytest.raises(FieldValidationError, match="unknown config field 'nope.x'"):
        c.applyOverride("nope.x", 1)
    c.doAstrometry = c.doPhotometry = False
    with pytest.raises(FieldValidationError, match="doAstrometry"):
        c.validate()


def test_field_kinds_and_freeze_and_equality():
    class Sub(Config):
        n = RangeField("n", int, default=1, min=0, max=3)

    class SubTask(Task):
        ConfigClass = Sub
        _DefaultName = "sub"

    class Top(Config):
        a = Field("a", float, default=1)
        b = ChoiceField("b", str, {"x": "ex", "y": "why"}, default="x")
        c = ListField("c", int, default=[1, 2], maxLength=3)
        s = SubTask.makeField("a subtask")

    t = Top()
    assert isinstance(Top._fields["s"], ConfigurableField) and t.a == 1.0 and t.c == (1, 2)
    t2 = Top()
    assert t == t2
    t2.s.n = 2
    assert t != t2
    with pytest.raises(FieldValidationError, match="'c'.*length <= 3"):
        t.c = [1, 2, 3, 4]
    t.freeze()
    with pytest.raises(FrozenConfigError):
        t.a = 2.0
    with pytest.raises(FrozenConfigError):
        t.s.n = 3  # sub-configs freeze too
    with pytest.raises(FrozenConfigError):
        t.s.retarget(SubTask)


def test_config_json_round_trip_and_overrides(tmp_path):
    c = JointcalConfig()
    c.applyOverrides(["astrometryVisitOrder=4", "sourceSelector.signalToNoiseMin=20",
                      "sourceSelector.badFlags=['a', 'b']", "astrometryModel=simple", "matchCut=2"])
    c.astrometryReferenceErr = 5.0
    c.save(tmp_path / "c.json")
    text = (tmp_path / "c.json").read_text()
    assert '"astrometryVisitOrder": 4' in text and '"signalToNoiseMin": 20.0' in text
    c2 = JointcalConfig().load(tmp_path / "c.json")
    assert c2 == c and c2.sourceSelector.badFlags == ("a", "b") and c2.matchCut == 2.0
    fc = c2.toFitConfig()
    assert (fc.visit_order, fc.min_snr, fc.astrometry_model, fc.reference_error_mas) == (4, 20.0, "simple", 5.0)
    # FitConfig names are accepted as aliases; a partial file applies onto defaults
    (tmp_path / "p.json").write_text(json.dumps({"visit_order": 3, "min_snr": 7, "photometry_model": "simple_flux"}))
    c3 = JointcalConfig.fromFile(tmp_path / "p.json")
    assert (c3.astrometryVisitOrder, c3.sourceSelector.signalToNoiseMin, c3.photometryModel) == (3, 7.0, "simpleFlux")
    # loading never imports code
    bad = json.loads(text)
    bad["astrometryFit"]["__target__"] = "os.system"
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(FieldValidationError, match="never imports code"):
        JointcalConfig().load(tmp_path / "bad.json")


def test_retarget_subtask(tmp_path):
    class MyFitConfig(Config):
        knob = Field("a knob", int, default=7)

    class MyFit(AstrometryFitTask):
        ConfigClass = MyFitConfig

        def run(self, *args, **kw):
            return "mine"

    c = JointcalConfig()
    c.astrometryFit.retarget(MyFit)
    c.astrometryFit.knob = 8
    task = JointcalTask(config=c)
    assert isinstance(task.astrometryFit, MyFit) and task.astrometryFit.config.knob == 8
    assert task.astrometryFit.run() == "mine"
    assert task.astrometryFit.getFullName() == "jointcal.astrometryFit"
    c.save(tmp_path / "r.json")  # the retarget survives a round trip (class already imported)
    c2 = JointcalConfig().load(tmp_path / "r.json")
    assert c2.astrometryFit.target is MyFit and c2.astrometryFit.knob == 8


# -- task handles -----------------------------------------------------------------------------------
def test_names_taskdict_subtasks_and_misc():
    task = JointcalTask()
    assert task.getName() == "jointcal" and task.getFullName() == "jointcal"
    d = task.getTaskDict()
    assert set(d) == {"jointcal", "jointcal.sourceSelector", "jointcal.associate", "jointcal.refObjLoader",
                      "jointcal.astrometryFit", "jointcal.photometryFit"}
    assert isinstance(d["jointcal.associate"], weakref.ref) and d["jointcal.associate"]() is task.associate
    assert task.log.name == "jcal.jointcal" and task.astrometryFit.log.name == "jcal.jointcal.astrometryFit"
    assert task.getResourceConfig() is None and JointcalTask.canMultiprocess is False
    assert isinstance(JointcalTask.makeField("doc"), ConfigurableField)
    assert task.getSchemaCatalogs() == {}
    with pytest.raises(TaskError, match="writeSchemas"):
        task.writeSchemas("/nonexistent")
    with pytest.raises(TaskError, match="no ConfigurableField 'doAstrometry'"):
        task.makeSubtask("doAstrometry")
    with pytest.raises(TaskError, match="supplied automatically"):
        task.makeSubtask("associate", config=None)
    assert JointcalTask(name="jc").getFullName() == "jc"


def test_timer_timemethod_and_metadata():
    class T(Task):
        _DefaultName = "t"

        @timeMethod
        def work(self):
            return 3

    t = T()
    assert t.work() == 3
    with t.timer("block", logLevel=logging.INFO):
        sum(range(1000))
    for item in ("work", "block"):
        for phase in ("Start", "End"):
            for k in ("Utc", "CpuTime", "UserTime", "SystemTime", "MaxResidentSetSize", "WallTime"):
                assert f"{item}{phase}{k}" in t.metadata
    assert t.metadata["blockEndCpuTime"] >= t.metadata["blockStartCpuTime"]
    assert t.metadata["workEndMaxResidentSetSize"] > 1e6  # bytes
    md = TaskMetadata()
    md["a.b.c"] = 1
    md.add("a.l", 1)
    md.add("a.l", 2)
    assert md["a"]["b"]["c"] == 1 and md["a.l"] == [1, 2]
    assert TaskMetadata.from_json(md.json()) == md
    t.emptyMetadata()
    assert len(t.metadata) == 0


def test_write_clobber_and_backup(tmp_path):
    task = JointcalTask()
    p = task.writeConfig(tmp_path)
    assert p.name == "jointcal_config.json" and JointcalConfig().load(p) == task.config
    task.writeConfig(tmp_path)  # identical: fine, untouched
    c = JointcalConfig()
    c.maxSteps = 3
    other = JointcalTask(config=c)
    with pytest.raises(TaskError, match="clobber=False"):
        other.writeConfig(tmp_path)
    other.writeConfig(tmp_path, clobber=True)  # doBackup: old one kept as ~1
    assert (tmp_path / "jointcal_config.json~1").exists()
    assert JointcalConfig().load(tmp_path / "jointcal_config.json").maxSteps == 3
    task.writeConfig(tmp_path, clobber=True, doBackup=False)
    assert not (tmp_path / "jointcal_config.json~2").exists()
    pv = task.writePackageVersions(tmp_path)
    versions = json.loads(pv.read_text())
    assert {"jcal", "jax", "jaxlib", "numpy", "astropy", "jax_backend", "jax_devices"} <= set(versions)
    task.writePackageVersions(tmp_path)  # same versions: fine
    pv.write_text(json.dumps({**versions, "numpy": "0.0.1"}))
    with pytest.raises(TaskError, match="numpy"):
        task.writePackageVersions(tmp_path)
    task.writePackageVersions(tmp_path, clobber=True)
    assert (tmp_path / "packages.json~1").exists()


# -- end to end -----------------------------------------------------------------------------------
def test_parse_and_run_writes_outputs(fitted):
    root, res = fitted
    assert res.exitStatus == 0 and res.resultList[0].exitStatus == 0
    out = root / "out"
    for name in ("metrics.json", "stars.parquet", "measurements.parquet", "jointcal_config.json",
                 "jointcal_metadata.json", "packages.json", "measurements_schema.json", "stars_schema.json"):
        assert (out / name).exists(), name
    assert len(list((out / "wcs").glob("*.fits"))) > 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["astrometry_chi2_per_ndof"] < 3
    cfg = JointcalConfig().load(out / "jointcal_config.json")
    assert cfg.astrometryVisitOrder == 3 and cfg.doPhotometry is False and cfg == res.config
    assert "ra" in json.loads((out / "stars_schema.json").read_text())
    md = json.loads((out / "jointcal_metadata.json").read_text())
    assert {"jointcal", "jointcal:astrometryFit", "jointcal:associate"} <= set(md)
    assert "runDirectoryStartUtc" in md["jointcal"] and "runEndCpuTime" in md["jointcal:astrometryFit"]
    assert md["jointcal"]["metrics"]["astrometry_final_ndof"] == metrics["astrometry_final_ndof"]


def test_run_struct_and_full_metadata(fitted):
    root, res = fitted
    struct = res.resultList[0].result
    task = res.task
    assert isinstance(struct, Struct) and struct.fitResult.photometry is None and struct.photoCalibs is None
    assert set(struct.wcsHeaders) == {tuple(k) for k in struct.fitResult.association.ccd_visits.tolist()}
    assert "CTYPE1" in struct.wcsHeaders[next(iter(struct.wcsHeaders))]
    assert struct.metrics["astrometry_final_chi2"] > 0 and "ra" in struct.stars
    full = task.getFullMetadata()
    assert full["jointcal:astrometryFit"]["chi2"] == pytest.approx(struct.metrics["astrometry_final_chi2"])
    assert set(task.getAllSchemaCatalogs()) == {"measurements", "stars"}
    assert "astrometryFit.run" in task.timingTable().replace("jointcal:", "")
    # rerun into the same directory: refused unless clobber
    r2 = JointcalTask.parseAndRun([str(root / "in"), "--out", str(root / "out"), *FAST])
    assert r2.exitStatus == 1


def test_cli_show_config_and_fit_errors(capsys, tmp_path):
    assert main(["fit", "--show-config", "--set", "astrometryVisitOrder=4", "--set", "min_snr=12"]) == 0
    text = capsys.readouterr().out
    assert "config.astrometryVisitOrder = 4" in text and "config.sourceSelector.signalToNoiseMin = 12.0" in text
    assert "config.astrometryFit.retarget(jcal.task.jointcal.AstrometryFitTask)" in text
    assert main(["fit", "--show-config", "--set", "astrometryModel=bogus"]) == 2  # one line, no traceback
    assert "astrometryModel" in capsys.readouterr().err
    with pytest.raises(FieldValidationError, match="astrometryModel"):
        main(["fit", "--show-config", "--set", "astrometryModel=bogus", "--traceback"])
    assert main(["fit", str(tmp_path / "missing"), "--out", str(tmp_path / "o"), "--quiet"]) == 1
