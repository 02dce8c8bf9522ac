"""No data loss and a named error for every bad input (issue 17).

Overwrite safety (only a previous jcal output is replaced), complete atomicity of every output
file including the Task facade's (kill -9 at several moments, a write failing midway with
ENOSPC), umask permissions, input screening (duplicate detections, detections outside their
detector, far-off first-guess WCSs) and config-file errors naming the file and line.
"""

import copy
import dataclasses
import errno
import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import jcal
from jcal.associate import associate
from jcal.data import InputError, SourceCatalog
from jcal.io import OutputExistsError, UnsafeOverwriteError, atomic_output_dir, check_target, verify_output
from jcal.io.atomic import current_umask
from jcal.io.manifest import MANIFEST, read_manifest
from jcal.screen import screen_input
from jcal.task import FieldValidationError, JointcalConfig, JointcalTask
from jcal.task.jointcal import SourceSelectorTask

from conftest import DATA

FAST = ["--set", "astrometryVisitOrder=2", "--no-photometry", "--quiet"]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sim():
    return jcal.simulate("tiny", seed=0)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, sim):
    """One tiny fit through the command line's Task facade, with the report: (root, parseAndRun result)."""
    root = tmp_path_factory.mktemp("hardening")
    jcal.write_simulation(sim, root / "in")
    res = JointcalTask.parseAndRun([str(root / "in"), "--out", str(root / "out"), *FAST, "--report", "--doraise"],
                                   doReturnResults=True)
    return root, res


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def _listing(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# -- overwrite safety ---------------------------------------------------------------------------------
def test_overwrite_never_replaces_a_foreign_folder(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    with pytest.raises(UnsafeOverwriteError, match=f"no {MANIFEST}.*nothing was deleted"):
        with atomic_output_dir(out, overwrite=True) as tmp:
            (tmp / "a.txt").write_text("x")
    assert (out / "thesis.tex").read_text() == "years of work" and _leftovers(tmp_path) == []
    link = tmp_path / "link"
    link.symlink_to(out)
    with pytest.raises(UnsafeOverwriteError, match="symbolic link"):
        check_target(link, True)
    (tmp_path / "file").write_text("f")
    with pytest.raises(UnsafeOverwriteError, match="a file"):
        check_target(tmp_path / "file", True)
    (tmp_path / "empty").mkdir()
    check_target(tmp_path / "empty", True)  # nothing to lose


def test_overwrite_refuses_files_jcal_did_not_write(tmp_path):
    out = tmp_path / "out"
    with atomic_output_dir(out) as tmp:
        (tmp / "a.txt").write_text("jcal")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.txt").write_text("jcal")
    assert verify_output(out) == []
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UnsafeOverwriteError, match="1 file.*notes.txt"):
        check_target(out, True)
    (out / "notes.txt").unlink()
    (out / "sub" / "b.txt").write_text("edited by hand")
    with pytest.raises(UnsafeOverwriteError, match="sub/b.txt"):
        check_target(out, True)
    assert verify_output(out) == ["sub/b.txt: 14 bytes, the manifest says 4"]
    (out / "sub" / "b.txt").write_text("jcal")
    with atomic_output_dir(out / "nested") as tmp:  # a jcal output inside one: the parent lists it
        (tmp / "c.txt").write_text("jcal")
    assert "nested/c.txt" in read_manifest(out)["files"] and verify_output(out) == []
    with atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "new.txt"] and _leftovers(tmp_path) == []


def test_overwrite_refuses_root_home_cwd_and_input(tmp_path, monkeypatch):
    home = tmp_path / "home"
    with atomic_output_dir(home) as tmp:  # even a jcal-marked home folder is never replaced
        (tmp / "a.txt").write_text("x")
    monkeypatch.setenv("HOME", str(home))
    with pytest.raises(UnsafeOverwriteError, match="root or home"):
        check_target(home, True)
    with pytest.raises(UnsafeOverwriteError, match="root or home"):
        check_target("/", True)
    work = tmp_path / "work"
    with atomic_output_dir(work) as tmp:
        (tmp / "b.txt").write_text("x")
    (work / "deep").mkdir()
    monkeypatch.chdir(work / "deep")
    with pytest.raises(UnsafeOverwriteError, match="working directory"):
        check_target(work, True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UnsafeOverwriteError, match="the input"):
        check_target(work, True, protect=[work / "deep"])


def test_cli_never_deletes_the_input_or_the_working_directory(tmp_path, monkeypatch, sim, caplog):
    inp = tmp_path / "input"
    jcal.write_simulation(sim, inp)  # a jcal output itself: only the input rule protects it
    before = _listing(inp)
    res = JointcalTask.parseAndRun([str(inp), "--out", str(inp), "--overwrite", *FAST])
    assert res.exitStatus == 1 and _listing(inp) == before
    (tmp_path / "thesis.tex").write_text("years of work")
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.ERROR):
        res = JointcalTask.parseAndRun(["input", "--out", ".", "--overwrite", *FAST])
    assert res.exitStatus == 1 and "working directory" in caplog.text
    assert (tmp_path / "thesis.tex").read_text() == "years of work" and _listing(inp) == before


def test_output_exists_names_the_cli_flag(fitted, caplog):
    root, _ = fitted
    with caplog.at_level(logging.ERROR):
        res = JointcalTask.parseAndRun([str(root / "in"), "--out", str(root / "out"), *FAST])
    assert res.exitStatus == 1 and "pass --overwrite" in caplog.text and "clobber" not in caplog.text
    with pytest.raises(OutputExistsError, match="clobber=True"):
        JointcalTask().runDirectory(root / "in", root / "out")
    with pytest.raises(OutputExistsError, match="overwrite=True"):
        check_target(root / "out", False)


# -- atomicity, manifest, permissions --------------------------------------------------------------
def test_every_output_file_is_in_the_manifest(fitted):
    root, res = fitted
    out = root / "out"
    assert res.exitStatus == 0 and verify_output(out) == [] and _leftovers(root) == []
    listed = set(read_manifest(out)["files"])
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} - {MANIFEST}
    assert listed == on_disk
    for name in ("jointcal_config.json", "jointcal_metadata.json", "packages.json", "measurements_schema.json",
                 "stars_schema.json", "metrics.json", "model.eqx", "report/index.html", f"report/{MANIFEST}"):
        assert name in listed, name
    assert str(out) in (out / "report" / "index.html").read_text()  # not the temporary folder's name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["input_screening"] == {"outside_detector": 0, "duplicate_detections": 0,
                                          "far_off_ccd_visits": 0, "excluded_ccd_visits": []}


def test_output_permissions_follow_the_umask(fitted):
    root, _ = fitted
    mask = current_umask()
    for p in (root / "out").rglob("*"):
        want = (0o777 if p.is_dir() else 0o666) & ~mask
        assert p.stat().st_mode & 0o777 == want, p


def test_a_write_failing_midway_keeps_the_previous_output(fitted, monkeypatch, tmp_path):
    root, res = fitted
    struct, task = res.resultList[0].result, res.task
    out = tmp_path / "out"
    struct.fitResult.write(out)
    before = _listing(out)

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr("jcal.result._write_parquet", full_disk)
        with pytest.raises(OSError, match="No space left"):
            struct.fitResult.write(out, overwrite=True)
    assert _listing(out) == before and verify_output(out) == [] and _leftovers(tmp_path) == []
    # the Task facade: its own files (here the schemas) fail inside the same temporary folder
    monkeypatch.setattr(task, "run", lambda data, progress=None: struct)
    with monkeypatch.context() as m:
        m.setattr(task, "writeSchemas", full_disk)
        with pytest.raises(OSError, match="No space left"):
            task.runDirectory(root / "in", tmp_path / "task_out")
    assert not (tmp_path / "task_out").exists() and _leftovers(tmp_path) == []
    task.runDirectory(root / "in", out, clobber=True)
    assert verify_output(out) == [] and (out / "stars_schema.json").exists()


# A child process writes a jcal output with `atomic_output_dir` (loaded without the rest of jcal, so it
# starts in milliseconds), stops at a chosen moment and is killed with SIGKILL there.
_CHILD = r"""
import os, sys, time, types
repo, out, stage, tag = sys.argv[1:5]
for name, sub in (("jcal", ""), ("jcal.io", "io")):
    module = types.ModuleType(name)
    module.__path__ = [os.path.join(repo, "jcal", sub)]
    sys.modules[name] = module
from jcal.io import atomic

def ready():
    print("READY", flush=True)
    time.sleep(60)

if stage == "manifest":  # files written, manifest being written
    write = atomic.write_manifest
    atomic.write_manifest = lambda tmp: (write(tmp), ready())
if stage == "swapped":  # the new output in place, the old one not yet removed
    publish = atomic._publish
    atomic._publish = lambda tmp, path: (publish(tmp, path), ready())[0]
if stage == "between":  # no renameat2 (other platforms): between moving the old aside and the new in
    atomic._renameat2 = lambda *args: False
    rename, calls = os.rename, []
    def slow_rename(a, b):
        rename(a, b)
        calls.append(b)
        if len(calls) == 1:
            ready()
    atomic.os.rename = slow_rename
with atomic.atomic_output_dir(out, overwrite=True) as tmp:
    for i in range(30):
        (tmp / f"f{i:02d}.txt").write_text(tag * 500)
        if stage == "writing" and i == 15:
            ready()
print("DONE", flush=True)
"""


def _state(out: Path) -> str:
    """"absent", or the tag of the complete output at `out` (else the test fails)."""
    if not out.exists():
        return "absent"
    assert verify_output(out) == [], f"incomplete output after a kill: {verify_output(out)}"
    tags = {p.read_text()[:3] for p in out.glob("f*.txt")}
    assert len(tags) == 1 and len(list(out.glob("f*.txt"))) == 30
    return tags.pop()


@pytest.mark.parametrize("stage, after_kill", [("writing", "old"), ("manifest", "old"), ("swapped", "new"),
                                               ("between", "absent")])
def test_kill_9_leaves_the_previous_or_a_complete_output(tmp_path, stage, after_kill):
    out = tmp_path / "out"
    with atomic_output_dir(out) as tmp:
        for i in range(30):
            (tmp / f"f{i:02d}.txt").write_text("old" * 500)
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(REPO), str(out), stage, "new"],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "READY"
    finally:
        child.kill()
        child.wait()
    assert _state(out) == after_kill
    # the next run cleans what the killed one left (and puts back an output it had set aside)
    atomic_module = sys.modules["jcal.io.atomic"]
    atomic_module._clean_stale(out)
    assert _state(out) in ("old", "new") and _leftovers(tmp_path) == []
    with atomic_output_dir(out, overwrite=True) as tmp:
        for i in range(30):
            (tmp / f"f{i:02d}.txt").write_text("3rd" * 500)
    assert _state(out) == "3rd" and _leftovers(tmp_path) == []


def test_kill_9_at_random_moments(tmp_path):
    """Killed after a random delay (anywhere from start-up to done), the output is the previous one
    or the complete new one."""
    out = tmp_path / "out"
    with atomic_output_dir(out) as tmp:
        for i in range(30):
            (tmp / f"f{i:02d}.txt").write_text("old" * 500)
    rng = np.random.default_rng(1)
    for delay in rng.uniform(0.0, 0.25, 5):
        child = subprocess.Popen([sys.executable, "-c", _CHILD, str(REPO), str(out), "none", "new"],
                                 stdout=subprocess.PIPE, text=True)
        try:
            child.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            child.kill()
        child.wait()
        assert _state(out) in ("old", "new")


# -- input screening ------------------------------------------------------------------------------
def _with_sources(data, rows=None, **changes):
    s = data.sources
    cols = {f.name: getattr(s, f.name) for f in dataclasses.fields(s)}
    if rows is not None:
        cols = {k: v[rows] for k, v in cols.items()}
    cols.update(changes)
    return dataclasses.replace(data, sources=SourceCatalog(**cols))


def _stars(data, config):
    data, summary = screen_input(data, config)
    a = associate(data, config)
    return a.n_stars, a.ccd_visits.tolist(), summary


def test_duplicate_detections_are_dropped_or_rejected(sim):
    cfg = jcal.FitConfig()
    n = len(sim.data.sources)
    stars, ccds, clean = _stars(sim.data, cfg)
    assert clean["duplicate_detections"] == 0
    rng = np.random.default_rng(0)
    for rows, count in ((np.r_[np.arange(n), rng.choice(n, 300, replace=False)], 300),
                        (rng.permutation(np.r_[np.arange(n), np.arange(n)]), n)):
        got_stars, got_ccds, summary = _stars(_with_sources(sim.data, rows), cfg)
        assert (got_stars, got_ccds, summary["duplicate_detections"]) == (stars, ccds, count)
    # same source_id on one detector-visit, elsewhere: a duplicate too
    rows = np.r_[np.arange(n), 0]
    x = sim.data.sources.x[rows].copy()
    x[-1] += 7.0
    assert screen_input(_with_sources(sim.data, rows, x=x), cfg)[1]["duplicate_detections"] == 1
    with pytest.raises(InputError, match=r"300 duplicate detection.*duplicateSources=error"):
        screen_input(_with_sources(sim.data, np.r_[np.arange(n), np.arange(300)]),
                     cfg.replace(duplicate_detections="error"))


def test_detections_outside_their_detector(sim):
    cfg = jcal.FitConfig()
    x, y = sim.data.sources.x.copy(), sim.data.sources.y.copy()
    x[:5] = y[:5] = 1e7
    x[5:8] = -0.5 - 0.5 * cfg.outside_margin_pixels  # within the margin: kept
    data = _with_sources(sim.data, x=x, y=y)
    screened, summary = screen_input(data, cfg)
    assert summary["outside_detector"] == 5 and len(screened.sources) == len(data.sources) - 5
    s = sim.data.sources
    with pytest.raises(InputError, match=rf"5 detection.*outside their detector.*visit={s.visit[0]}, "
                                         rf"detector={s.detector[0]}"):
        screen_input(data, cfg.replace(outside_detector="error"))


def _moved(data, keys, degrees=30.0):
    ccds = dict(data.ccd_visits)
    for key in keys:
        wcs = copy.deepcopy(ccds[key].wcs)
        wcs.wcs.crval = [(wcs.wcs.crval[0] + degrees) % 360, wcs.wcs.crval[1]]
        ccds[key] = dataclasses.replace(ccds[key], wcs=wcs)
    return dataclasses.replace(data, ccd_visits=ccds)


def test_far_off_detector_visit_is_excluded_and_named(sim, caplog):
    bad = (1001, 2)
    data = _moved(sim.data, [bad])
    with pytest.raises(InputError, match=r"1 detector-visit.*far from everything.*\(visit=1001, detector=2\)"):
        screen_input(data, jcal.FitConfig(far_off_wcs="error"))
    with caplog.at_level(logging.WARNING, logger="jcal.screen"):
        result = jcal.fit(data, jcal.FitConfig(photometry=False, visit_order=2))  # no gauge/singular error
    assert "(visit=1001, detector=2)" in caplog.text
    metrics = result.metrics["input_screening"]
    assert metrics["far_off_ccd_visits"] == 1 and metrics["excluded_ccd_visits"] == [list(bad)]
    assert list(bad) not in result.association.ccd_visits.tolist() and len(result.association.ccd_visits) == 15


def test_far_off_whole_visit_is_excluded_and_named(sim):
    keys = [k for k in sim.data.ccd_visits if k[0] == 1002]
    data = _moved(sim.data, keys)
    with pytest.raises(InputError, match=r"4 detector-visit.*visit=1002, detector=0"):
        screen_input(data, jcal.FitConfig(far_off_wcs="error"))
    screened, summary = screen_input(data, jcal.FitConfig())
    assert summary["excluded_ccd_visits"] == [list(k) for k in sorted(keys)]
    assert 1002 not in screened.sources.visit and len(associate(screened, jcal.FitConfig()).visits) == 3
    # every visit far from the others and from the reference catalog: nothing to fit
    for i, visit in enumerate(np.unique(sim.data.sources.visit)):
        data = _moved(data if i else sim.data, [k for k in sim.data.ccd_visits if k[0] == visit], 40.0 * i)
    r = sim.data.refcat
    refcat = type(r)(**{**{f.name: getattr(r, f.name) for f in dataclasses.fields(r)}, "ra": (r.ra + 200.0) % 360})
    with pytest.raises(InputError, match="do not cover the same sky"):
        screen_input(dataclasses.replace(data, refcat=refcat), jcal.FitConfig())


def test_real_lsst_data_loses_nothing_to_screening():
    from jcal.io.lsst import read_lsst
    data = read_lsst(DATA / "cfht_minimal", reference_error_mas=10.0).data
    screened, summary = screen_input(data, jcal.FitConfig())
    assert screened is data and summary["duplicate_detections"] == summary["outside_detector"] == 0
    assert summary["far_off_ccd_visits"] == 0


# -- config errors --------------------------------------------------------------------------------
def test_config_file_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "maxSteps": 3,\n  "matchCut": 2\n  "x": 1\n}\n')
    with pytest.raises(FieldValidationError, match=r"bad.json, line 4, column 3: invalid JSON"):
        JointcalConfig().load(bad)
    with pytest.raises(jcal.ConfigError, match=r"bad.json, line 4, column 3: invalid JSON"):
        jcal.FitConfig.load(bad)
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(FieldValidationError, match="nested too deeply"):
        JointcalConfig().load(deep)
    deep.write_text('{"colorterms": ' + '{"a": ' * 200 + "{}" + "}" * 201)  # parses, but too deep
    with pytest.raises(FieldValidationError, match="nested too deeply"):
        JointcalConfig().load(deep)
    value = tmp_path / "value.json"
    value.write_text('{\n  "maxSteps": 3,\n  "matchCut": -2\n}\n')
    with pytest.raises(FieldValidationError, match=r"value.json, line 3: config field 'matchCut'"):
        JointcalConfig().load(value)
    value.write_text('{\n  "visit_order": 3,\n  "tolerance": -1\n}\n')
    with pytest.raises(jcal.ConfigError, match=r"value.json, line 3: config field 'tolerance'"):
        jcal.FitConfig.load(value)


def test_retarget_to_an_unrelated_task_is_refused(tmp_path):
    c = JointcalConfig()
    with pytest.raises(FieldValidationError, match="not a subclass of jcal.task.jointcal.AssociationTask"):
        c.associate.retarget(SourceSelectorTask)
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"associate": {"__target__": "jcal.task.jointcal.SourceSelectorTask"}}))
    with pytest.raises(FieldValidationError, match=r"r.json, line 1: .*'associate'.*not a subclass"):
        JointcalConfig().load(path)


def test_python_write_never_replaces_the_folder_data_was_read_from(fitted):
    root, res = fitted
    data = jcal.read_input(root / "in")
    result = dataclasses.replace(res.resultList[0].result.fitResult, data=data)
    before = _listing(root / "in")
    with pytest.raises(UnsafeOverwriteError, match="the input"):
        result.write(root / "in", overwrite=True)
    assert _listing(root / "in") == before


def test_report_rewritten_in_place_keeps_the_manifest_complete(fitted):
    from jcal.report import make_report
    root, _ = fitted
    out = root / "out"
    make_report(out)  # `jcal report OUT`: replaces report/, a jcal output inside a jcal output
    assert verify_output(out) == [] and verify_output(out / "report") == [] and _leftovers(out) == []
    check_target(out, True)  # still a replaceable jcal output
