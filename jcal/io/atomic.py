"""Atomic output directories: a directory appears complete at its final path, or not at all.

Every jcal output directory (simulations, fit results, reports) is written through
`atomic_output_dir`: the writer fills a temporary sibling directory; on success every file is
fsync'ed and listed (size, SHA-256) in `jcal_manifest.json` (`jcal.io.manifest`), and one
rename puts the directory in place. A crash, a `kill -9`, an exception or a full disk
therefore leaves either the previous state or a complete output, never a half-written
directory that looks finished. The rename is atomic because the temporary directory lives in
the same parent, hence on the same filesystem; replacing an output swaps the two directories
in one step (Linux ``renameat2(RENAME_EXCHANGE)``; elsewhere two renames, undone by the next
run if a kill falls between them) and removes the old one only after the swap.

Replacing (``overwrite=True``, the CLI's ``--overwrite``) is allowed only for a previous jcal
output: a folder whose manifest lists every file it holds, unchanged (`check_target`). The
input folder, the working directory or a folder containing it, ``/`` and the home folder are
never replaced. Temporary folders of killed runs are removed by the next write to the same path.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import errno
import logging
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

from jcal.io.manifest import MANIFEST, ManifestError, foreign_files, record, write_manifest, _sync_dir

__all__ = ["atomic_output_dir", "check_target", "current_umask", "OutputExistsError", "UnsafeOverwriteError",
           "overwrite_hint"]

log = logging.getLogger("jcal.io")

# How the user asks for a replacement, named in errors: "overwrite=True" (Python), "clobber=True"
# (the Task facade) or "--overwrite" (the command line), set by the outermost caller.
_DEFAULT_HINT = "overwrite=True"
_HINT: contextvars.ContextVar[str] = contextvars.ContextVar("jcal_overwrite_hint", default=_DEFAULT_HINT)
_NAMED = 5  # foreign files named in one error


class OutputExistsError(FileExistsError):
    """The output path exists and replacing it was not asked for."""


class UnsafeOverwriteError(OutputExistsError):
    """Replacing the output path was asked for but would delete something jcal did not write."""


@contextlib.contextmanager
def overwrite_hint(text: str) -> Iterator[None]:
    """Inside the block, errors name the option that allows replacing an output as `text`
    (e.g. "--overwrite"), unless an outer caller has named it already."""
    token = _HINT.set(text) if _HINT.get() == _DEFAULT_HINT else None
    try:
        yield
    finally:
        if token is not None:
            _HINT.reset(token)


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _is_within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_target(path: str | os.PathLike, overwrite: bool, protect=()) -> None:
    """Raise unless `path` may be written: absent, or (with `overwrite`) a replaceable jcal output.

    protect: paths (the inputs) that must survive; a target equal to or containing one is refused.
    OutputExistsError: `path` exists and `overwrite` is False. UnsafeOverwriteError: replacing
    it would delete something jcal did not write (see the module docstring).
    """
    path = Path(path).absolute()
    if not (path.exists() or path.is_symlink()):
        return
    hint = _HINT.get()
    if not overwrite:
        raise OutputExistsError(f"output {str(path)!r} already exists (pass {hint} to replace a previous "
                                "jcal output, or choose another output folder)")

    def refuse(why: str):
        raise UnsafeOverwriteError(f"refusing to replace {str(path)!r} ({hint}): {why}; nothing was deleted")

    if path.is_symlink():
        refuse("it is a symbolic link")
    if not path.is_dir():
        refuse("it is a file, not a jcal output folder")
    real = path.resolve()
    if real == Path(real.anchor) or real == Path.home().resolve():
        refuse("it is the root or home folder")
    if _is_within(Path.cwd().resolve(), real):
        refuse("it is the working directory or contains it")
    for p in protect:
        if p is not None and _is_within(Path(p).absolute().resolve(), real):
            refuse(f"it is (or contains) the input {str(p)!r}")
    if not any(path.iterdir()):
        return  # an empty folder: nothing to lose
    if not (path / MANIFEST).is_file():
        refuse(f"it has no {MANIFEST}, so it is not a jcal output (jcal replaces only folders it wrote)")
    try:
        foreign = foreign_files(path)
    except ManifestError as exc:
        refuse(str(exc))
    if foreign:
        more = f" and {len(foreign) - _NAMED} more" if len(foreign) > _NAMED else ""
        refuse(f"it holds {len(foreign)} file(s) jcal did not write or that changed since: "
               f"{', '.join(foreign[:_NAMED])}{more}")


# -- renames ---------------------------------------------------------------------------------------
_RENAME_NOREPLACE, _RENAME_EXCHANGE, _AT_FDCWD = 1, 2, -100


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """Linux renameat2; False where unsupported (then the caller falls back to os.rename)."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    if err == errno.EEXIST:
        raise OutputExistsError(f"output {str(dst)!r} appeared while writing (pass {_HINT.get()} to replace it)")
    raise OSError(err, os.strerror(err), str(dst))


def _publish(tmp: Path, path: Path) -> Path | None:
    """Put `tmp` at `path` in one step; returns the folder now holding the replaced output, if any."""
    if not (path.exists() or path.is_symlink()):
        if not _renameat2(tmp, path, _RENAME_NOREPLACE):
            os.rename(tmp, path)
        return None
    if _renameat2(tmp, path, _RENAME_EXCHANGE):
        return tmp  # the old output now sits at the temporary name
    old = _sibling(path, "old")
    os.rename(path, old)  # a kill from here to the next rename is undone by _clean_stale
    try:
        os.rename(tmp, path)
    except BaseException:
        os.rename(old, path)
        raise
    return old


# -- temporary folders -----------------------------------------------------------------------------
_HOST = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:16] or "host"


def _sibling(path: Path, kind: str) -> Path:
    """A fresh name ``.{name}.{kind}-{host}.{pid}-XXXX`` beside `path` (not created)."""
    made = Path(tempfile.mkdtemp(prefix=f".{path.name}.{kind}-{_HOST}.{os.getpid()}-", dir=path.parent))
    made.rmdir()
    return made


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_stale(path: Path) -> None:
    """Remove the temporary folders that killed runs writing `path` left behind (this host's, whose
    process is gone); a replaced output set aside just before a kill is put back if `path` is absent."""
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(tmp|old)-{_HOST}\.(\d+)-[^/]+$")
    with contextlib.suppress(OSError):
        for entry in path.parent.iterdir():
            m = pattern.match(entry.name)
            if m is None or int(m.group(2)) == os.getpid() or _alive(int(m.group(2))):
                continue
            if m.group(1) == "old" and not (path.exists() or path.is_symlink()):
                os.rename(entry, path)
                log.warning("%s: restored the previous output that a killed run had set aside", path)
            else:
                shutil.rmtree(entry, ignore_errors=True)
                log.info("%s: removed %s left by a killed run", path.parent, entry.name)


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike, overwrite: bool = False, *, protect=()) -> Iterator[Path]:
    """Yield a temporary directory that becomes `path`, complete, when the block succeeds.

    The temporary directory is a sibling ``.{name}.tmp-{host}.{pid}-XXXX``. On an exception it
    is removed and `path` is untouched. After the block every file is fsync'ed and listed in
    `jcal_manifest.json`, then the directory is renamed into place (swapped with the previous
    output when replacing, which is then removed). An existing `path` raises `OutputExistsError`
    (before the block runs, and again before the rename) unless ``overwrite=True``; replacing
    what is not a previous jcal output raises `UnsafeOverwriteError` (`check_target`, with
    `protect`: the input paths). If `path.parent` is itself a jcal output, its manifest is
    updated to list the new sub-folder.
    """
    path = Path(path).absolute()
    check_target(path, overwrite, protect)
    path.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{_HOST}.{os.getpid()}-", dir=path.parent))
    # mkdtemp makes a private (0700) directory; the result should look like any mkdir'd one.
    os.chmod(tmp, 0o777 & ~current_umask())
    try:
        yield tmp
        write_manifest(tmp)
        check_target(path, overwrite, protect)  # it may have appeared or changed meanwhile
        replaced = _publish(tmp, path)
        _sync_dir(path.parent)
        if replaced is not None:
            shutil.rmtree(replaced, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if (path.parent / MANIFEST).is_file():
        record(path.parent, [path.name])
