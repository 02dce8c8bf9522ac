"""Property-based fuzzing of the input readers (hypothesis).

Random corruptions of a small valid input -- columns dropped or renamed, NaN/inf, wrong dtypes,
absurd values, truncated files, random bytes, deleted lines -- must give `InputError` (or a
valid result that screening and association accept or reject with `InputError`), never another
exception type. Both readers: jcal's input directory and LSST outputs (tests/data/cfht_minimal).
Examples are few and derandomised, so the run is short and reproducible.
"""

import dataclasses
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jcal
from jcal.data import InputError
from jcal.io.lsst import read_lsst
from jcal.screen import screen_input

from conftest import DATA

# JCAL_FUZZ_EXAMPLES=N explores N random examples per test instead (a longer, non-reproducible hunt).
_DEEP = os.environ.get("JCAL_FUZZ_EXAMPLES")
SETTINGS = settings(max_examples=int(_DEEP or 25), deadline=None, derandomize=not _DEEP, database=None, report_multiple_bugs=False,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def small_input(tmp_path_factory):
    """A valid jcal input folder: 2 visits x 2 detectors of the tiny survey (~640 detections)."""
    d = jcal.simulate("tiny", seed=0).data
    keys = {k for k in d.ccd_visits if k[0] in (1000, 1001) and k[1] in (0, 1)}
    rows = np.flatnonzero([(v, det) in keys for v, det in zip(d.sources.visit, d.sources.detector)])
    small = dataclasses.replace(d, sources=d.sources.take(rows),
                                ccd_visits={k: v for k, v in d.ccd_visits.items() if k in keys})
    return jcal.write_input(small, tmp_path_factory.mktemp("fuzz") / "in")


def _edit_parquet(path: Path, draw) -> None:
    table = pq.read_table(path)
    names = table.schema.names
    name = draw(st.sampled_from(names))
    col = table.column(name).to_numpy(zero_copy_only=False)
    kind = draw(st.sampled_from(["drop", "rename", "nonfinite", "strings", "bools", "huge", "empty", "nulls"]))
    cols = {n: table.column(n) for n in names}
    if kind == "drop":
        del cols[name]
    elif kind == "rename":
        cols[draw(st.text(min_size=1, max_size=8))] = cols.pop(name)
    elif kind in ("nonfinite", "huge") and col.dtype.kind == "f":
        rows = draw(st.lists(st.integers(0, len(col) - 1), min_size=1, max_size=5))
        col = col.copy()
        col[rows] = draw(st.sampled_from([np.nan, np.inf, -np.inf])) if kind == "nonfinite" else \
            draw(st.sampled_from([1e300, -1e300, 1e7, -1e7]))
        cols[name] = pa.array(col)
    elif kind == "strings":
        cols[name] = pa.array([str(v) + "x" for v in col])
    elif kind == "bools":
        cols[name] = pa.array(np.asarray(col, dtype=object) == col[0]) if len(col) else pa.array([], pa.bool_())
    elif kind == "nulls":
        mask = np.zeros(len(col), bool)
        mask[: draw(st.integers(1, 5))] = True
        cols[name] = pa.array(col, mask=mask) if col.dtype.kind in "fiub" else cols[name]
    elif kind == "empty":
        cols = {n: c.slice(0, 0) for n, c in cols.items()}
    pq.write_table(pa.table(cols), path)


def _edit_bytes(path: Path, draw) -> None:
    data = bytearray(path.read_bytes())
    kind = draw(st.sampled_from(["truncate", "random", "empty", "delete_line"]))
    if kind == "truncate":
        data = data[: draw(st.integers(0, max(len(data) - 1, 0)))]
    elif kind == "random":
        start = draw(st.integers(0, max(len(data) - 1, 0)))
        data[start:start + 64] = draw(st.binary(min_size=1, max_size=64))
    elif kind == "empty":
        data = bytearray()
    else:
        lines = bytes(data).split(b"\n")
        del lines[draw(st.integers(0, len(lines) - 1))]
        data = bytearray(b"\n".join(lines))
    path.write_bytes(bytes(data))


def _corrupt(root: Path, draw) -> None:
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != "jcal_manifest.json")
    path = draw(st.sampled_from(files))
    if path.suffix == ".parquet" and draw(st.booleans()):
        try:
            return _edit_parquet(path, draw)
        except (pa.ArrowException, OSError):  # already corrupted by an earlier edit
            pass
    _edit_bytes(path, draw)


def _fit_inputs(data) -> None:
    """Screening and association accept valid data or raise InputError."""
    config = jcal.FitConfig()
    screened, _ = screen_input(data, config)
    jcal.associate(screened, config)


def _check(read, folder: Path) -> None:
    try:
        _fit_inputs(read(folder))
    except InputError:
        pass


@SETTINGS
@given(data=st.data())
def test_corrupted_input_folder_gives_input_error(small_input, tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("case") / "in"
    shutil.copytree(small_input, folder)
    for _ in range(data.draw(st.integers(1, 2))):
        _corrupt(folder, data.draw)
    _check(jcal.read_input, folder)


@SETTINGS
@given(data=st.data())
def test_corrupted_lsst_folder_gives_input_error(tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("lsst") / "cfht"
    shutil.copytree(DATA / "cfht_minimal", folder, ignore=shutil.ignore_patterns("README.md", "src_afw"))
    _corrupt(folder, data.draw)
    _check(lambda f: read_lsst(f, reference_error_mas=10.0).data, folder)
