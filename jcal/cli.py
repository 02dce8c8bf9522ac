"""Command line: `jcal fit`, `jcal simulate`, `jcal demo`. Thin layers over the Python API."""

from __future__ import annotations

import argparse
import ast
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
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "fit":  # a thin shell over the Task facade
        _setup_logging("--quiet" in argv)
        from .task import JointcalTask
        return JointcalTask.parseAndRun(argv[1:]).exitStatus
    parser = argparse.ArgumentParser(prog="jcal", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    # `jcal fit` is JointcalTask.parseAndRun (intercepted above); listed here for --help only.
    sub.add_parser("fit", add_help=False,
                   help="fit a directory (JointcalTask.parseAndRun; `jcal fit --help` for options)")

    p = sub.add_parser("simulate", help="write a simulated survey (input format + truth/)")
    p.add_argument("preset", nargs="?", default="small", help="tiny, small, medium, large, huge")
    p.add_argument("out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("demo", help="simulate a small survey on the fly and fit it")
    p.add_argument("--out", default="jcal-demo-out")
    p.add_argument("--preset", default="small")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--report", action="store_true", help="also write the diagnostic report")

    p = sub.add_parser("report", help="write the diagnostic report (PNG + HTML) of a fit's output directory")
    p.add_argument("out_dir")

    args = parser.parse_args(argv)
    _setup_logging(getattr(args, "quiet", False))
    import jcal

    if args.command == "simulate":
        sim = jcal.simulate(args.preset, seed=args.seed)
        jcal.write_simulation(sim, args.out, overwrite=args.overwrite)
        print(f"wrote {len(sim.data.sources)} detections to {args.out}")
        return 0
    if args.command == "report":
        from .report import make_report
        print(make_report(args.out_dir))
        return 0
    if args.command == "demo":
        sim = jcal.simulate(args.preset, seed=0)
        config = jcal.FitConfig()  # the same defaults as `jcal fit` and jcal.fit
        with tempfile.TemporaryDirectory() as tmp:  # exercise the real reader on the demo too
            jcal.write_simulation(sim, Path(tmp) / "input")
            data = jcal.read_input(Path(tmp) / "input")
        metrics = run_fit(data, config, Path(args.out), quiet=args.quiet, overwrite=True, timings={})
        if "astrometry_chi2_per_ndof" in metrics and not args.quiet:
            print(f"astrometry chi2/ndof = {metrics['astrometry_chi2_per_ndof']:.4f}")
        if args.report:
            from .report import make_report
            print(make_report(Path(args.out)))
        return 0
    return 2  # pragma: no cover - argparse only accepts the commands above


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
