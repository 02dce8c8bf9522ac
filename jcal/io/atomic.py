"""Atomic output directories: a directory appears complete at its final path, or not at all.

Every jcal output directory (simulations, fit results, reports) is written through
`atomic_output_dir`: the writer fills a temporary sibling directory and only a successful
exit renames it into place. A crash, an exception or a full disk therefore never leaves a
half-written directory where a later run (or a person) would take it for a finished one.
The rename is atomic because the temporary directory lives in the same parent, hence on the
same filesystem.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_output_dir"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that is renamed to `path` when the block succeeds.

    The temporary directory is a sibling of `path` named ``.{name}.tmp-<random>``. On an
    exception it is removed and nothing appears at `path` (an existing `path` is left
    untouched). If `path` already exists, `FileExistsError` is raised (before the block runs,
    and again at the end in case it appeared meanwhile) unless ``overwrite=True``; then the old
    directory is moved aside to ``.{name}.old-<random>`` and removed only after the new one
    is in place, so a failed rename leaves the old one restored.
    """
    path = Path(path).absolute()
    if path.exists() and not overwrite:
        raise FileExistsError(f"output {str(path)!r} already exists (pass overwrite=True to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    # mkdtemp makes a private (0700) directory; the result should look like any mkdir'd one.
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        old = None
        if path.exists() or path.is_symlink():
            if not overwrite:
                raise FileExistsError(f"output {str(path)!r} appeared while writing (pass overwrite=True)")
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            old.rmdir()  # only the unique name was wanted; rename needs a free target
            os.rename(path, old)
        try:
            os.rename(tmp, path)
        except BaseException:
            if old is not None:
                os.rename(old, path)  # put the previous output back
            raise
        if old is not None:
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
