"""Benchmark of the user's path: simulate a survey, write it in jcal's input format, run the command
line `jcal fit IN --out OUT` with its DEFAULT configuration in a subprocess, and measure it against
the truth from what it wrote.

    python benchmarks/user_path.py edge:0,1,2 medium:0 [--device gpu] [--warm-cache] [--set k=v ...]

Each run prints one JSON line (preset, seed, sizes, wall time of the command, its stage timings
from metrics.json, peak RSS of the command, mapping error vs truth: RMS / median / worst visit /
worst detector-visit in mas, photometric calibration error vs truth in mmag, detector-visits
without output, held-out residuals as the fit reported them), then a table of all runs. Nothing
assumes a CPU: `--device` only sets JAX_PLATFORMS for the command (default: JAX's own choice).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import jcal

from jcal.truth import mapping_errors, photometric_errors  # noqa: E402


def run_cli(args: list[str], env: dict) -> tuple[float, float, int, str]:
    """(wall s, peak RSS GB, exit status, stderr tail) of `python -m jcal.cli ARGS`."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen([sys.executable, "-m", "jcal.cli", *args], env=env, stdout=subprocess.DEVNULL,
                                stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage, not all children's
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        err.seek(0)
        tail = err.read().decode(errors="replace")[-3000:]
    rss_gb = usage.ru_maxrss / (1024**2 if sys.platform != "darwin" else 1024**3)
    return wall, rss_gb, proc.returncode, tail


def accuracy(sim, out: Path) -> dict:
    """Accuracy of what `jcal fit` wrote in `out` against `sim.truth`."""
    truth = sim.truth
    tm = truth.measurements
    all_keys = np.unique(np.stack([tm.visit, tm.detector], 1), axis=0)
    with_wcs = np.array([(out / "wcs" / f"{v}_{d}.fits").exists() for v, d in all_keys.tolist()])
    solution = jcal.load_model(out / "model")
    fitted = {(int(v), int(d)) for v, d in solution.ccd_visits.tolist()}
    rows = np.flatnonzero([(v, d) in fitted for v, d in zip(tm.visit.tolist(), tm.detector.tolist())])
    res = {"ccd_visits": int(len(all_keys)), "ccd_visits_without_wcs": int((~with_wcs).sum()),
           "ccd_visits_without_model": int(len(all_keys) - len(fitted & set(map(tuple, all_keys.tolist())))),
           "mapping": {k: round(v, 4) for k, v in mapping_errors(solution.pixel_to_sky, truth, rows).items()}}
    if (out / "photometry_model.json").exists():
        phot = jcal.load_photometric_model(out / "photometry_model")
        fitted_p = {(int(v), int(d)) for v, d in phot.ccd_visits.tolist()}
        prow = np.flatnonzero([(v, d) in fitted_p for v, d in zip(tm.visit.tolist(), tm.detector.tolist())])
        res["photometry"] = {k: round(v, 3) for k, v in photometric_errors(phot.calibration, truth, prow).items()}
    return res


def one_run(preset: str, seed: int, args) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"jcal-user-{preset}-{seed}-") as tmp:
        tmp = Path(tmp)
        sim = jcal.simulate(preset, seed=seed)
        jcal.write_simulation(sim, tmp / "input")
        env = dict(os.environ)
        if not args.warm_cache:  # cold: compilation included, as on a user's first run
            env["JCAL_COMPILATION_CACHE"] = str(tmp / "cache")
        if args.device:
            env["JAX_PLATFORMS"] = args.device
        cli = ["fit", str(tmp / "input"), "--out", str(tmp / "out"), "--quiet"]
        for pair in args.set or []:
            cli += ["--set", pair]
        wall, rss, status, tail = run_cli(cli, env)
        row = {"preset": preset, "seed": seed, "detections": len(sim.data.sources), "exit_status": status,
               "wall_s": round(wall, 2), "peak_rss_gb": round(rss, 2)}
        if status != 0:
            row["stderr_tail"] = tail
            return row
        m = json.loads((tmp / "out" / "metrics.json").read_text())
        row["timings_s"] = {k: round(v, 2) for k, v in m.get("timings", {}).items() if isinstance(v, (int, float))}
        row["astrometry_stage_s"] = {k: round(v, 2) for k, v in m.get("astrometry_stage_seconds", {}).items()}
        row["astrometry_chi2_per_ndof"] = m.get("astrometry_chi2_per_ndof")
        row.update(accuracy(sim, tmp / "out"))
        held = m.get("holdout") or {}
        row["holdout"] = {k: v for k, v in held.items() if not k.startswith("per_")}  # one line per run
        if held.get("per_visit"):
            row["holdout"]["worst_visit_rms_mas"] = max(p["rms_mas"] or 0.0 for p in held["per_visit"].values())
        row["ccd_visits_not_fitted_reported"] = len(m.get("ccd_visits_not_fitted", []))
        return row


def table(rows: list[dict]) -> str:
    head = (f"{'preset':<10} {'seed':>4} {'wall s':>7} {'RSS GB':>6} {'rms mas':>8} {'median':>7} {'worst v':>8} "
            f"{'worst dv':>8} {'phot mmag':>9} {'core':>6} {'no out':>6} {'held-out rms mas':>16}")
    lines = [head]
    for r in rows:
        if r.get("exit_status"):
            lines.append(f"{r['preset']:<10} {r['seed']:>4} failed with exit status {r['exit_status']}")
            continue
        mp, ph = r["mapping"], r.get("photometry", {})
        held = (r.get("holdout") or {}).get("astrometry_rms_mas", float("nan"))
        lines.append(f"{r['preset']:<10} {r['seed']:>4} {r['wall_s']:>7.1f} {r['peak_rss_gb']:>6.2f} "
                     f"{mp['rms_mas']:>8.3f} {mp['median_mas']:>7.3f} {mp['worst_visit_mas']:>8.3f} "
                     f"{mp['worst_ccd_visit_mas']:>8.3f} {ph.get('rms_mmag', float('nan')):>9.2f} "
                     f"{ph.get('core_mmag', float('nan')):>6.2f} {r['ccd_visits_without_wcs']:>6d} {held:>16.3f}")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="PRESET or PRESET:SEED[,SEED...] (presets of jcal.simulate)")
    p.add_argument("--device", choices=["cpu", "gpu", "cuda"], help="JAX_PLATFORMS for the fit (default: JAX's)")
    p.add_argument("--warm-cache", action="store_true", help="use the persistent compilation cache")
    p.add_argument("--set", action="append", help="a config override passed to `jcal fit --set`")
    args = p.parse_args()
    rows = []
    for spec in args.runs:
        preset, _, seeds = spec.partition(":")
        for seed in [int(s) for s in seeds.split(",")] if seeds else [0]:
            rows.append(one_run(preset, seed, args))
            print(json.dumps(rows[-1]), flush=True)
    print(table(rows))


if __name__ == "__main__":
    main()
