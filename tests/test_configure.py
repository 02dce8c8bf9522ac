"""JAX is configured by `jcal.configure()`, not by importing jcal; the cache folder must be private.

Import-time behaviour needs fresh interpreters (the test process is configured by conftest), so
those checks run short scripts in subprocesses."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import jcal
from jcal import jax_setup


def _run(code: str, **env) -> str:
    """Run `code` in a fresh interpreter; its stdout (stderr shown on failure)."""
    full_env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", **env}
    full_env.pop("XLA_FLAGS", None)
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=full_env, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_import_changes_no_jax_setting():
    out = _run("""
        import os
        import jcal, jcal_models, jcal.task, jcal.cli, jcal.report
        import jax
        from jax._src import xla_bridge
        print(os.environ.get("XLA_FLAGS"), jax.config.jax_enable_x64,
              jax.config.values["jax_cpu_enable_async_dispatch"], jax.config.jax_compilation_cache_dir,
              xla_bridge.backends_are_initialized())
    """)
    assert out.split() == ["None", "False", "True", "None", "False"]


def test_configure_sets_everything_once_and_fit_insists_on_x64(tmp_path):
    cache = tmp_path / "cache"
    out = _run("""
        import os, warnings
        import jcal
        import jax
        first = jcal.configure()
        again = jcal.configure()
        print(sorted(first), again, os.environ["XLA_FLAGS"], jax.config.jax_enable_x64,
              jax.config.jax_compilation_cache_dir == os.environ["JCAL_COMPILATION_CACHE"],
              oct(os.stat(os.environ["JCAL_COMPILATION_CACHE"]).st_mode & 0o777))
        jax.config.update("jax_enable_x64", False)
        try:
            jcal.fit(None)
        except jcal.JaxConfigurationError as exc:
            print("refused:", exc)
    """, JCAL_COMPILATION_CACHE=str(cache))
    lines = out.splitlines()
    assert lines[0].split() == ["['XLA_FLAGS',", "'jax_compilation_cache_dir',", "'jax_cpu_enable_async_dispatch',",
                                "'jax_enable_x64']", "{}", "--xla_cpu_multi_thread_eigen=false", "True", "True",
                                "0o700"]
    assert "64-bit floats" in lines[1] and "turned off after jcal.configure()" in lines[1]


def test_fit_configures_when_nobody_did_and_declining_x64_is_named():
    out = _run("""
        import warnings
        import jax, jax.numpy as jnp
        import jcal
        import jcal_models as jm
        low = jm.simple_flux(jnp.ones(3))  # built with 64-bit floats off: float32
        jnp.ones(1).block_until_ready()  # the backend starts: configure() is late now
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                jcal.fit(None, astrometry_model=low)
            except TypeError as exc:  # configured (late, x64 on), then the model is checked
                print("type:", exc)
        print("late:", any("after JAX started" in str(w.message) for w in caught), jax.config.jax_enable_x64)
        float32 = jm.Grouped(jm.Polynomial(coeffs=jnp.zeros((2, 2, 3), jnp.float32), center=jnp.zeros((2, 2)),
                             half_width=jnp.ones((2, 2)), order=1), by="detector")
        try:
            jcal.fit(None, astrometry_model=float32)
        except jcal.JaxConfigurationError as exc:
            print("float32:", exc)
    """, JCAL_COMPILATION_CACHE="0")
    assert "astrometry_model must be a jcal_models.Transform" in out
    assert "late: True True" in out
    assert "float32: astrometry_model holds arrays of less than 64-bit precision (.inner.coeffs)" in out
    out = _run("""
        import jcal
        jcal.configure(x64=False)
        try:
            jcal.fit(None)
        except jcal.JaxConfigurationError as exc:
            print(exc)
    """, JCAL_COMPILATION_CACHE="0")
    assert "jax_enable_x64 is off (jcal.configure(x64=False) was called)" in out


def test_loading_a_saved_model_configures(tmp_path):
    import jcal_models as jm
    model = jm.simple_flux(np.array([1.5, 2.5]))  # float64: this process is configured
    ids = dict(visits=np.array([1]), detectors=np.array([0, 1]), ccd_visits=np.array([[1, 0], [1, 1]]),
               bands=("r",), visit_band=np.array([0]), band_detectors=np.array([[0, 0], [0, 1]]))
    jcal.PhotometricSolution(model, **ids).save(tmp_path / "photometry_model")
    out = _run(f"""
        import jax, jcal
        loaded = jcal.load_photometric_model({str(tmp_path / "photometry_model")!r})
        print(jax.config.jax_enable_x64, loaded.model.ccd_visit.inner.value.dtype,
              loaded.calibration(1, [0, 1], 5.0, 5.0).tolist())
    """, JCAL_COMPILATION_CACHE="0")
    assert out.split() == ["True", "float64", "[1.5,", "2.5]"]


def test_cache_folder_must_be_private(tmp_path, monkeypatch):
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    assert jax_setup.cache_dir_problem(private) is None
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    assert "writable by group or others" in jax_setup.cache_dir_problem(shared)
    (tmp_path / "file").write_text("")
    assert jax_setup.cache_dir_problem(tmp_path / "file") == "is not a directory"
    inside = shared / "cache"
    inside.mkdir(mode=0o700)
    assert "others can write to" in jax_setup.cache_dir_problem(inside)
    monkeypatch.setattr(os, "getuid", lambda: os.stat(private).st_uid + 1)
    assert "not by this user" in jax_setup.cache_dir_problem(private)
    monkeypatch.undo()
    with pytest.warns(UserWarning, match="compilation cache not used: .*shared is writable by group or others"):
        assert jax_setup._cache_folder(shared) is None


def test_configure_refuses_a_shared_cache_folder(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    out = _run("""
        import warnings, jax, jcal
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            applied = jcal.configure()
        print("jax_compilation_cache_dir" in applied, jax.config.jax_compilation_cache_dir,
              [str(w.message) for w in caught])
    """, JCAL_COMPILATION_CACHE=str(shared))
    assert out.startswith("False None") and "compilation cache not used" in out


def test_conftest_configured_this_process():
    import jax
    assert jax.config.jax_enable_x64 and jcal.jax_setup._state["configured"]
