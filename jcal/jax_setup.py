"""`configure()`: the JAX settings jcal's fits need, applied on request, not on import.

`import jcal` (and `import jcal_models`) changes nothing in JAX: a notebook that uses JAX beside
jcal keeps its own settings until it calls `jcal.configure()`, or until the first jcal call that
fits (`jcal.fit`, the Task facade, the CLI), which calls it if nobody has.

What it sets:
- `jax_enable_x64`: sky positions need float64 (a fit refuses to start without it);
- single-threaded Eigen on CPU (`XLA_FLAGS=--xla_cpu_multi_thread_eigen=false`): XLA's
  multi-threaded Eigen pool was seen to wedge for good in jcal's large vmapped steps (jaxlib
  0.10.2); ignored by GPU backends. Opt out with `JCAL_XLA_MULTITHREAD=1`;
- CPU async dispatch off: it hangs some large programs (jax-ml/jax#25861); jcal synchronises
  after every step anyway;
- a persistent compilation cache (`JCAL_COMPILATION_CACHE=DIR`, `=0` off; default
  `~/.cache/jcal/xla`), used only from a folder owned by the user and writable by nobody else:
  compiled programs are code, and a folder others can write would run theirs.

XLA_FLAGS and async dispatch are read when JAX's backend starts (the first computation), so
call `configure()` early. Called later, it warns that those two cannot change in this process,
and still sets x64 and the cache.
"""

from __future__ import annotations

import logging
import os
import stat
import warnings
from pathlib import Path

import jax

log = logging.getLogger("jcal")

_SINGLE_THREAD_FLAG = "--xla_cpu_multi_thread_eigen=false"
# Programs compiling in over 0.1 s are kept (15 of ~100 per medium fit, ~1 MB); see benchmarks/.
_CACHE_MIN_COMPILE_SECONDS = 0.1
_state: dict = {"configured": False, "x64": None}


class JaxConfigurationError(RuntimeError):
    """JAX is set up in a way jcal cannot fit with (64-bit floats off)."""


def _read(name: str):
    """A JAX config value (some, like async dispatch, are not attributes of `jax.config`)."""
    return getattr(jax.config, name) if hasattr(jax.config, name) else jax.config.values.get(name)


def _backend_started() -> bool:
    try:
        from jax._src import xla_bridge
        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):  # pragma: no cover - another jax layout: assume the worst
        return True


def default_cache_dir() -> Path | None:
    """The compilation cache folder `JCAL_COMPILATION_CACHE` names (None: `=0`, off)."""
    chosen = os.environ.get("JCAL_COMPILATION_CACHE", str(Path.home() / ".cache" / "jcal" / "xla"))
    return None if chosen == "0" else Path(chosen)


def cache_dir_problem(folder: Path) -> str | None:
    """Why `folder` must not hold the compilation cache (None: it may). It must be a directory
    owned by this user, not writable by group or others, in a parent only its owner (or, with
    the sticky bit, nobody else's files) can rename it out of."""
    if not hasattr(os, "getuid"):  # pragma: no cover - no POSIX owners (Windows): nothing to check
        return None
    try:
        info = os.stat(folder)
    except OSError as exc:
        return f"cannot be read ({exc.strerror})"
    if not stat.S_ISDIR(info.st_mode):
        return "is not a directory"
    if info.st_uid != os.getuid():
        return f"is owned by uid {info.st_uid}, not by this user (uid {os.getuid()})"
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"is writable by group or others (mode {stat.filemode(info.st_mode)})"
    parent = os.stat(Path(folder).resolve().parent)
    if parent.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not parent.st_mode & stat.S_ISVTX:
        return "sits in a folder others can write to (without the sticky bit), so they could replace it"
    return None


def _cache_folder(folder: Path) -> Path | None:
    """`folder` created (mode 0700) if missing and checked; None, with a warning, if unsafe."""
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        warnings.warn(f"jcal: no compilation cache: cannot create {folder} ({exc.strerror})", stacklevel=3)
        return None
    problem = cache_dir_problem(folder)
    if problem:
        warnings.warn(f"jcal: compilation cache not used: {folder} {problem}; fix its permissions or set "
                      "JCAL_COMPILATION_CACHE to a private folder (=0: no cache)", stacklevel=3)
        return None
    return folder


def configure(*, x64: bool = True, cpu_single_thread: bool | None = None, async_dispatch: bool = False,
              compilation_cache: str | Path | bool | None = True) -> dict:
    """Set JAX up for jcal's fits; idempotent. Returns what it set.

    x64: turn on 64-bit floats (False: leave them as they are; a fit then refuses to start if off).
    cpu_single_thread: single-threaded Eigen on CPU (default: on unless `JCAL_XLA_MULTITHREAD=1`).
    async_dispatch: keep JAX's CPU async dispatch (default off, see the module docstring).
    compilation_cache: True: the folder `JCAL_COMPILATION_CACHE` names (default ~/.cache/jcal/xla);
        a path: that folder; False/None: leave the cache setting alone. Checked as `cache_dir_problem`.
    """
    if cpu_single_thread is None:
        cpu_single_thread = os.environ.get("JCAL_XLA_MULTITHREAD") != "1"
    applied: dict = {}
    late = _backend_started()
    flags = os.environ.get("XLA_FLAGS", "")
    if cpu_single_thread and "xla_cpu_multi_thread_eigen" not in flags:
        if late and jax.default_backend() == "cpu":
            warnings.warn("jcal.configure() was called after JAX started its CPU backend: single-threaded Eigen "
                          "and async dispatch cannot change in this process (call jcal.configure() before any "
                          "JAX computation); 64-bit floats and the cache are still set", stacklevel=2)
        elif not late:
            os.environ["XLA_FLAGS"] = f"{flags} {_SINGLE_THREAD_FLAG}".strip()
            applied["XLA_FLAGS"] = os.environ["XLA_FLAGS"]
    if not async_dispatch and _read("jax_cpu_enable_async_dispatch"):
        jax.config.update("jax_cpu_enable_async_dispatch", False)
        applied["jax_cpu_enable_async_dispatch"] = False
    if x64 and not _read("jax_enable_x64"):
        jax.config.update("jax_enable_x64", True)
        applied["jax_enable_x64"] = True
    if compilation_cache and not _read("jax_compilation_cache_dir"):
        folder = default_cache_dir() if compilation_cache is True else Path(compilation_cache)
        folder = folder and _cache_folder(folder)
        if folder is not None:
            jax.config.update("jax_compilation_cache_dir", str(folder))
            jax.config.update("jax_persistent_cache_min_compile_time_secs", _CACHE_MIN_COMPILE_SECONDS)
            applied["jax_compilation_cache_dir"] = str(folder)
    _state.update(configured=True, x64=x64)
    return applied


def ensure_configured() -> None:
    """Called where a fit starts: `configure()` unless done; then insist on 64-bit floats."""
    if not _state["configured"]:
        configure()
    if not _read("jax_enable_x64"):
        why = ("jcal.configure(x64=False) was called" if _state["x64"] is False
               else "it was turned off after jcal.configure()")
        raise JaxConfigurationError(f"jcal fits need 64-bit floats, but jax_enable_x64 is off ({why}); call "
                                    "jcal.configure() (or jax.config.update('jax_enable_x64', True)) before fitting")


def require_float64(model, name: str) -> None:
    """Refuse a starting model holding float32 arrays (made while 64-bit floats were off)."""
    import jax.numpy as jnp

    low = [jax.tree_util.keystr(path) for path, leaf in jax.tree_util.tree_leaves_with_path(model)
           if getattr(leaf, "dtype", None) is not None and jnp.issubdtype(leaf.dtype, jnp.floating)
           and leaf.dtype.itemsize < 8]
    if low:
        raise JaxConfigurationError(f"{name} holds arrays of less than 64-bit precision ({', '.join(low[:3])}): it "
                                    "was built before 64-bit floats were on; call jcal.configure() before building it")
