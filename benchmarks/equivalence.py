"""Same behaviour before and after a refactoring: run `jcal fit` with its defaults on simulated
presets and on the shipped CFHT sample, and compare everything it wrote with a saved digest.

    python benchmarks/equivalence.py save DIR  [CASE ...]   # before the change
    python benchmarks/equivalence.py check DIR [CASE ...]   # after it: worst relative difference per file

A CASE is a simulator preset (seed 0), `PRESET:SEED`, or `cfht_minimal` (the jointcal-parity
configuration on tests/data). The digest holds every number written: table columns, JSON leaves
(timings, dates, versions and file hashes excluded), FITS headers and the saved model leaves. A
difference is |a - b| / max|a| over each array; `check` exits 1 when any exceeds --tolerance.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CASES = ["tiny", "small", "edge_small", "medium", "edge", "large", "cfht_minimal"]
# JSON keys whose values change from run to run (or name the run), not results of the fit
VOLATILE = ("time", "second", "timing", "date", "version", "packages", "sha256", "path", "host", "created",
            "elapsed", "wall", "directory", "command", "utc", "cpu", "residentsetsize", "rss", "memory", "compile")


def run_case(case: str, out: Path, tmp: Path) -> None:
    env = dict(os.environ, JCAL_COMPILATION_CACHE=str(tmp / "cache"))
    if case == "cfht_minimal":
        args = ["fit", str(ROOT / "tests/data/cfht_minimal"), "--lsst", "--config",
                str(ROOT / "configs/jointcal_cfht_minimal.json")]
    else:
        import jcal
        preset, _, seed = case.partition(":")
        sim = jcal.simulate(preset, seed=int(seed or 0))
        jcal.write_simulation(sim, tmp / "input")
        args = ["fit", str(tmp / "input")]
    subprocess.run([sys.executable, "-m", "jcal.cli", *args, "--out", str(out), "--quiet"], env=env, check=True)


def _json_leaves(value, key: str, out: dict) -> None:
    name = key.lower().rsplit("/", 1)[-1]
    if any(v in name for v in VOLATILE) or name.endswith("_s"):  # "_s": seconds
        return
    if isinstance(value, dict):
        for k, v in value.items():
            _json_leaves(v, f"{key}/{k}", out)
    elif isinstance(value, list) and value and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                   for v in value):
        out[key] = np.asarray(value, float)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _json_leaves(v, f"{key}[{i}]", out)
    elif isinstance(value, bool) or value is None or isinstance(value, str):
        out[key] = np.asarray(str(value))
    elif isinstance(value, (int, float)):
        out[key] = np.asarray(float(value))


def digest(out: Path) -> dict[str, np.ndarray]:
    """Every number `jcal fit` wrote in `out`, by 'file:key'."""
    import pyarrow.parquet as pq
    from astropy.io import fits

    import jcal
    d: dict[str, np.ndarray] = {}
    for path in sorted(out.rglob("*")):
        rel = str(path.relative_to(out))
        if path.suffix == ".parquet":
            table = pq.read_table(path)
            for name in table.column_names:
                col = table[name].to_numpy(zero_copy_only=False)
                d[f"{rel}:{name}"] = col.astype(float) if col.dtype.kind in "fiub" else col.astype(str)
        elif path.suffix == ".json" and path.name not in ("packages.json", "jcal_manifest.json"):
            leaves: dict = {}
            _json_leaves(json.loads(path.read_text()), "", leaves)
            d.update({f"{rel}:{k}": v for k, v in leaves.items()})
        elif path.suffix == ".fits":
            with fits.open(path) as hdus:
                for i, hdu in enumerate(hdus):
                    for card, value in hdu.header.items():
                        if card.startswith("DATE") or card in ("COMMENT", "HISTORY", ""):
                            continue
                        d[f"{rel}:{i}:{card}"] = (np.asarray(float(value)) if isinstance(value, (int, float))
                                                  else np.asarray(str(value)))
                    if getattr(hdu, "data", None) is not None and hdu.data.dtype.names is None:
                        d[f"{rel}:{i}:data"] = np.asarray(hdu.data, float)
    for name, load in (("model", jcal.load_model), ("photometry_model", jcal.load_photometric_model)):
        if (out / f"{name}.json").exists():
            import jax
            solution = load(out / name)
            model = getattr(solution, "model", solution)
            for i, leaf in enumerate(jax.tree.leaves(model)):
                d[f"{name}.eqx:leaf{i}"] = np.asarray(leaf, float)
    return d


def compare(before: dict, after: dict) -> dict[str, float]:
    """Worst relative difference per file (inf: a key or a string differs)."""
    worst: dict[str, float] = {}
    for key in sorted(set(before) | set(after)):
        file = key.split(":", 1)[0].split("/")[0] if key.startswith("wcs/") else key.split(":", 1)[0]
        if key not in before or key not in after:
            diff = np.inf
        else:
            a, b = before[key], after[key]
            if a.dtype.kind in "US" or b.dtype.kind in "US" or a.shape != b.shape:
                diff = 0.0 if a.shape == b.shape and np.array_equal(a, b) else np.inf
            else:
                same = (a == b) | (np.isnan(a) & np.isnan(b))
                scale = np.nanmax(np.abs(a)) if a.size and np.isfinite(a).any() else 1.0
                diff = 0.0 if same.all() else float(np.nanmax(np.abs(a - b)[~same]) / max(scale, 1e-300))
        if diff > worst.get(file, -1.0):
            worst[file] = diff
            if diff > 0:
                worst[f"{file} (worst key)"] = key  # type: ignore[assignment]
    return worst


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=["save", "check"])
    p.add_argument("directory", type=Path)
    p.add_argument("cases", nargs="*", default=DEFAULT_CASES)
    p.add_argument("--tolerance", type=float, default=1e-10)
    args = p.parse_args()
    args.directory.mkdir(parents=True, exist_ok=True)
    failed = False
    for case in args.cases:
        with tempfile.TemporaryDirectory(prefix=f"jcal-equiv-{case}-") as tmp:
            tmp = Path(tmp)
            run_case(case, tmp / "out", tmp)
            d = digest(tmp / "out")
        saved = args.directory / f"{case.replace(':', '_')}.npz"
        if args.mode == "save":
            np.savez_compressed(saved, **{k.replace("/", "|"): v for k, v in d.items()})
            print(f"{case}: {len(d)} values saved", flush=True)
            continue
        with np.load(saved) as z:
            before = {k.replace("|", "/"): z[k] for k in z.files}
        worst = compare(before, d)
        bad = {k: v for k, v in worst.items() if not k.endswith("(worst key)") and v > args.tolerance}
        top = max((v for k, v in worst.items() if not k.endswith("(worst key)")), default=0.0)
        print(f"{case}: {len(d)} values, worst relative difference {top:.3g}"
              + ("" if not bad else "; over tolerance: " + ", ".join(
                  f"{k} {v:.3g} ({worst.get(k + ' (worst key)')})" for k, v in sorted(bad.items()))), flush=True)
        failed |= bool(bad)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
