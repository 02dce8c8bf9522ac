"""Command line: `jcal fit`, `jcal simulate`, `jcal demo`. Thin layers over the Python API."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

log = logging.getLogger("jcal")


def parse_overrides(pairs: list[str]) -> dict:
    """`key=value` strings -> dict; values are Python literals (never executed) or bare strings."""
    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise SystemExit(f"--set expects key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        try:
            out[key.strip()] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key.strip()] = value
    return out


def _config(args):
    from .config import FitConfig
    values = json.loads(Path(args.config).read_text()) if getattr(args, "config", None) else {}
    values.update(parse_overrides(getattr(args, "set", None)))
    if getattr(args, "no_astrometry", False):
        values["astrometry"] = False
    if getattr(args, "no_photometry", False):
        values["photometry"] = False
    return FitConfig.from_dict(values)


def _setup_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(name)s: %(message)s",
                        stream=sys.stderr)


def run_fit(data, config, out: Path, *, quiet: bool, overwrite: bool, timings: dict) -> dict:
    import jcal
    t0 = time.perf_counter()
    progress = None if quiet else (lambda stage, chi2: log.info("%s done: chi2 = %.6g", stage, chi2))
    result = jcal.fit(data, config, progress=progress)
    timings["fit"] = time.perf_counter() - t0
    n = len(result.association.ccd_visits)
    with tqdm(total=n, desc="writing WCS", disable=quiet, file=sys.stderr) as bar:
        result.timings.update(timings)
        result.write(out, overwrite=overwrite, progress=bar.update)
    metrics = result.metrics
    if not quiet:
        for key in ("astrometry_final_chi2", "astrometry_final_ndof", "astrometry_outliers",
                    "photometry_final_chi2", "photometry_final_ndof"):
            if key in metrics:
                print(f"{key}: {metrics[key]}")
        print(f"wrote {out}")
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jcal", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("fit", help="fit a directory in jcal's input format")
    p.add_argument("input")
    p.add_argument("--out", required=True)
    p.add_argument("--config", help="JSON file of FitConfig fields")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one config field")
    p.add_argument("--no-astrometry", action="store_true")
    p.add_argument("--no-photometry", action="store_true")
    p.add_argument("--show-config", action="store_true", help="print the full config and exit")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true")

    p = sub.add_parser("simulate", help="write a simulated survey (input format + truth/)")
    p.add_argument("preset", nargs="?", default="small", help="tiny, small, medium, large, huge")
    p.add_argument("out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("demo", help="simulate a small survey on the fly and fit it")
    p.add_argument("--out", default="jcal-demo-out")
    p.add_argument("--preset", default="small")
    p.add_argument("--quiet", action="store_true")

    args = parser.parse_args(argv)
    _setup_logging(getattr(args, "quiet", False))
    import jcal

    if args.command == "simulate":
        sim = jcal.simulate(args.preset, seed=args.seed)
        jcal.write_simulation(sim, args.out, overwrite=args.overwrite)
        print(f"wrote {len(sim.data.sources)} detections to {args.out}")
        return 0
    if args.command == "demo":
        sim = jcal.simulate(args.preset, seed=0)
        config = jcal.FitConfig(visit_order=3)
        with tempfile.TemporaryDirectory() as tmp:  # exercise the real reader on the demo too
            jcal.write_simulation(sim, Path(tmp) / "input")
            data = jcal.read_input(Path(tmp) / "input")
        metrics = run_fit(data, config, Path(args.out), quiet=args.quiet, overwrite=True, timings={})
        if "astrometry_chi2_per_ndof" in metrics and not args.quiet:
            print(f"astrometry chi2/ndof = {metrics['astrometry_chi2_per_ndof']:.4f}")
        return 0
    config = _config(args)
    if args.show_config:
        print(json.dumps(dataclasses.asdict(config), indent=2))
        return 0
    t0 = time.perf_counter()
    data = jcal.read_input(args.input)
    timings = {"read": time.perf_counter() - t0}
    run_fit(data, config, Path(args.out), quiet=args.quiet, overwrite=args.overwrite, timings=timings)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
