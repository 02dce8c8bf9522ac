"""Every notebook in notebooks/ (jupytext percent-format .py) runs top to bottom, in < 60 s, without
a warning: neither a Python warning nor a warning logged by jcal (a notebook that opens on a
warning about its own example data teaches the reader to ignore warnings)."""

import logging
import os
import runpy
import time
import warnings
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("[0-9][0-9]_*.py"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, monkeypatch, caplog):
    os.environ.setdefault("MPLBACKEND", "Agg")
    monkeypatch.chdir(path.parent)
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING, logger="jcal"):
        warnings.simplefilter("always")
        runpy.run_path(str(path), run_name="__main__")
    assert time.perf_counter() - t0 < 60
    ours = [w for w in caught if not issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning))]
    assert not ours, [f"{w.category.__name__}: {w.message}" for w in ours]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


def test_notebooks_force_no_backend():
    """Plots show inline in Jupyter: no notebook picks a non-interactive backend itself."""
    for path in NOTEBOOKS:
        assert 'use("Agg")' not in path.read_text(), path.name
