"""The mark of a jcal output folder: `jcal_manifest.json`, the list of files jcal wrote there.

Every folder written through `jcal.io.atomic_output_dir` carries, at its top, a manifest
listing each file it holds with its size and SHA-256, written (and fsync'ed, with every file)
just before the folder's one atomic rename. It serves two ends:

- **completeness**: `verify(folder)` re-reads the files and names any that is missing, of
  another size or checksum (a reader can check an output it was handed);
- **ownership**: `--overwrite` / ``overwrite=True`` replaces only a folder whose manifest lists
  every file it holds, unchanged (`jcal.io.atomic.check_target`); jcal never deletes a file it
  did not write. A sub-folder with its own valid manifest (``report/``) counts as jcal's too.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
from pathlib import Path

__all__ = ["MANIFEST", "read_manifest", "write_manifest", "verify", "foreign_files", "record", "ManifestError"]

MANIFEST = "jcal_manifest.json"
_FORMAT = "jcal-output-manifest"
_PART = f".{MANIFEST}.part"  # the manifest being rewritten (left behind only by a kill)
_CHUNK = 1 << 20


class ManifestError(ValueError):
    """A manifest that cannot be read (corrupt JSON or not jcal's format)."""


def _hash_and_sync(path: Path, sync: bool) -> dict:
    """{"size", "sha256"} of a file, fsync'ed on the way (its bytes reach the disk before the rename)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(block)
        if sync:
            os.fsync(fh.fileno())
        size = os.fstat(fh.fileno()).st_size
    return {"size": size, "sha256": digest.hexdigest()}


def _sync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def _walk(root: Path, skip_manifest: bool = True):
    """(relative posix path, path) of every file under root (but the root manifest), sorted."""
    out = []
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            full = Path(dirpath) / name
            rel = full.relative_to(root).as_posix()
            if rel != MANIFEST or not skip_manifest:
                out.append((rel, full))
    return sorted(out)


def write_manifest(root: str | os.PathLike, *, sync: bool = True) -> dict:
    """List (size, SHA-256) every file under `root` in ``root/jcal_manifest.json``; fsync files,
    manifest and folders when `sync`. Returns the manifest."""
    root = Path(root)
    files = {rel: _hash_and_sync(full, sync) for rel, full in _walk(root)}
    manifest = {"format": _FORMAT, "version": 1, "jcal_version": _jcal_version(), "files": files}
    _write_json(root / MANIFEST, manifest, sync)
    if sync:
        for dirpath, _, _ in os.walk(root):
            _sync_dir(Path(dirpath))
    return manifest


def _jcal_version() -> str:
    try:  # from the installed metadata: this module imports nothing of jcal (kill tests load it alone)
        return importlib.metadata.version("jcal")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _write_json(path: Path, content: dict, sync: bool) -> None:
    tmp = path.with_name(_PART)
    with open(tmp, "w") as fh:
        fh.write(json.dumps(content, indent=1, sort_keys=True) + "\n")
        fh.flush()
        if sync:
            os.fsync(fh.fileno())
    os.replace(tmp, path)


def read_manifest(root: str | os.PathLike) -> dict | None:
    """The manifest of `root`, or None when it has none. ManifestError if it is unreadable."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as exc:
        raise ManifestError(f"{path}: unreadable manifest: {exc}") from exc
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if manifest.get("format") != _FORMAT or not isinstance(files, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("size"), int) and isinstance(v.get("sha256"), str)
            for v in files.values()):
        raise ManifestError(f"{path}: not a jcal output manifest")
    return manifest


def verify(root: str | os.PathLike) -> list[str]:
    """Problems of `root` against its manifest: listed files missing, or of another size or
    SHA-256 (an incomplete or altered output). [] when complete. ManifestError without one."""
    return [f"{rel}: {why}" for rel, why in _problems(Path(root))]


def _problems(root: Path) -> list[tuple[str, str]]:
    manifest = read_manifest(root)
    if manifest is None:
        raise ManifestError(f"{root}: no {MANIFEST}; not a (complete) jcal output")
    problems = []
    for rel, entry in sorted(manifest["files"].items()):
        path = root / rel
        if not path.is_file():
            problems.append((rel, "missing"))
            continue
        found = _hash_and_sync(path, sync=False)
        if found["size"] != entry["size"]:
            problems.append((rel, f"{found['size']} bytes, the manifest says {entry['size']}"))
        elif found["sha256"] != entry["sha256"]:
            problems.append((rel, "content differs from the manifest (SHA-256)"))
    return problems


def foreign_files(root: str | os.PathLike) -> list[str]:
    """Entries under `root` that jcal did not write (or that changed since): files missing from
    its manifest or differing from it, links, and sub-folders that are neither listed nor jcal
    outputs themselves. ManifestError when `root` has no readable manifest."""
    root = Path(root)
    manifest = read_manifest(root)
    if manifest is None:
        raise ManifestError(f"{root}: no {MANIFEST}")
    listed = manifest["files"]
    foreign = [rel for rel, why in _problems(root) if why != "missing"]
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        for name in list(dirnames):
            sub = here / name
            rel = sub.relative_to(root).as_posix()
            if sub.is_symlink():
                foreign.append(rel)
                dirnames.remove(name)
            elif not any(k.startswith(rel + "/") for k in listed):
                dirnames.remove(name)  # an unlisted folder: fine only if it is a jcal output itself
                if not _is_own_output(sub):
                    foreign.append(rel + "/")
        for name in filenames:
            rel = (here / name).relative_to(root).as_posix()
            if rel not in (MANIFEST, _PART) and (rel not in listed or (here / name).is_symlink()):
                foreign.append(rel)
    return sorted(set(foreign))


def _is_own_output(path: Path) -> bool:
    try:
        return (path / MANIFEST).is_file() and not foreign_files(path)
    except ManifestError:
        return False


def record(root: str | os.PathLike, names) -> None:
    """Update the manifest of `root` (if it has one) for files written or renamed after it:
    existing `names` (relative paths; a folder means every file below it) are (re)listed,
    vanished ones dropped."""
    root = Path(root)
    try:
        manifest = read_manifest(root)
    except ManifestError:
        return
    if manifest is None:
        return
    files = manifest["files"]
    for name in names:
        rel = Path(name).as_posix()
        for key in [k for k in files if k == rel or k.startswith(rel + "/")]:
            del files[key]
        path = root / rel
        if path.is_file():
            files[rel] = _hash_and_sync(path, sync=True)
        elif path.is_dir():
            files.update({f"{rel}/{sub}": _hash_and_sync(full, sync=True)
                          for sub, full in _walk(path, skip_manifest=False)})
    manifest["files"] = files
    _write_json(root / MANIFEST, manifest, sync=True)
