"""The command line as a new user meets it: one-line errors with suggestions, a fast --help,
progress that --quiet silences."""

import io
import subprocess
import sys

import pytest

from jcal.cli import PRESETS, main
from jcal.progress import Progress


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_mistakes_end_in_one_line_with_a_suggestion(capsys, tmp_path):
    assert main(["simulate", "smal", str(tmp_path / "x")]) == 2
    assert "did you mean 'small'" in one_line_error(capsys)
    assert main(["fit", str(tmp_path), "--out", str(tmp_path / "o"), "--set", "astrometryVisitOrdr=3"]) == 2
    assert "did you mean 'astrometryVisitOrder'" in one_line_error(capsys)
    assert main(["report", str(tmp_path / "nothere")]) == 2
    assert "does not exist" in one_line_error(capsys)
    with pytest.raises(FileNotFoundError):
        main(["report", str(tmp_path / "nothere"), "--traceback"])


def test_help_imports_neither_jax_nor_astropy():
    code = ("import sys\nfrom jcal.cli import main\n"
            "for argv in (['--help'], ['fit', '--help'], ['demo', '--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "print(sorted(m for m in ('jax', 'astropy', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"
    assert "--wcs-format" in out and "--traceback" in out


def test_presets_agree_with_the_simulator():
    from jcal.simulate import PRESETS as SIMULATOR_PRESETS
    assert tuple(SIMULATOR_PRESETS) == PRESETS


def test_progress_steps_and_quiet():
    stream = io.StringIO()
    progress = Progress(file=stream)
    with progress.step("reading"):
        progress("astrometry stars", 12.5)
    with progress.step("writing", total=3) as update:
        update(3)
    text = stream.getvalue()
    assert "reading" in text and "done" in text and "astrometry stars done: chi2 = 12.5" in text and "3/3" in text
    silent = io.StringIO()
    quiet = Progress(enabled=False, file=silent)
    with quiet.step("reading"), quiet.step("writing", total=2) as update:
        update(2)
        quiet("stage", 1.0)
    assert silent.getvalue() == ""


def test_lazy_package_keeps_its_names_and_jax_settings():
    """`import jcal` loads no JAX and changes no JAX setting (`jcal.configure()` does), and the
    public functions named like submodules (simulate, associate) stay functions."""
    code = ("import sys, jcal\nassert 'jax' not in sys.modules\n"
            "import jcal.simulate, jcal.associate\n"
            "assert callable(jcal.simulate) and callable(jcal.associate) and callable(jcal.fit)\n"
            "import jcal.solver, jax\n"
            "assert not jax.config.jax_enable_x64\n"
            "jcal.configure()\n"
            "assert jax.config.jax_enable_x64 and not jax.config.read('jax_cpu_enable_async_dispatch')\n"
            "assert jcal.io.read_input is jcal.read_input\nprint('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr


def test_demo_keeps_its_input_and_compares_with_the_truth(tmp_path, capsys):
    out = tmp_path / "demo-out"
    assert main(["demo", "--preset", "tiny", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert (tmp_path / "demo-out-input" / "sources.parquet").is_file()  # the input, beside the output
    assert (tmp_path / "demo-out-input" / "truth").is_dir() and (out / "metrics.json").is_file()
    assert "mas RMS per coordinate" in text and "mmag RMS" in text
    assert f"next: jcal report {out}" in text
    assert main(["demo", "--preset", "tiny", "--out", str(out), "--quiet"]) == 0  # reruns over its own files
    assert capsys.readouterr().out == ""
