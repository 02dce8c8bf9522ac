"""Every notebook in notebooks/ (jupytext percent-format .py) runs top to bottom, in < 60 s."""

import os
import runpy
import time
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("[0-9][0-9]_*.py"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, monkeypatch):
    os.environ.setdefault("MPLBACKEND", "Agg")
    monkeypatch.chdir(path.parent)
    t0 = time.perf_counter()
    runpy.run_path(str(path), run_name="__main__")
    assert time.perf_counter() - t0 < 60
