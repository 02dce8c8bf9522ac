"""Command line: `jcal fit`, `jcal simulate`, `jcal demo`, `jcal report`. Thin layers over the Python API.

Imports are lazy: `jcal --help` and `jcal fit --help` load neither JAX nor astropy. A user's
mistake (a misspelled preset or config field, a missing folder, bad input) ends in one line on
stderr and exit status 2 (1 for a failure of jcal itself); `--traceback` (or `--doraise`) shows
the whole traceback instead. Every long step shows progress on stderr, silent under `--quiet`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .config import did_you_mean

log = logging.getLogger("jcal")

# jcal.simulate.PRESETS' names, here so that --help needs no import (a test checks they agree)
PRESETS = ("tiny", "small", "medium", "large", "huge", "edge", "edge_small")  # jcal.simulate.PRESETS (a test checks)
WCS_FORMATS = ("sip", "tpv", "both")
_USER_ERRORS = {"InputError", "ConfigError", "FieldValidationError", "TaskError", "UsageError"}
_FIT_ERRORS = {"FitError", "SingularSystemError"}  # the data cannot support the fit asked for: the message says why


class UsageError(ValueError):
    """A mistake on the command line (an unknown preset, a malformed --set)."""


def fit_argument_parser() -> argparse.ArgumentParser:
    """The options of `jcal fit` (`JointcalTask.makeArgumentParser`), defined here so that
    `jcal fit --help` needs none of the fitting code."""
    p = argparse.ArgumentParser(prog="jcal fit", description="Joint calibration of a directory of inputs.")
    p.add_argument("input", nargs="?", help="input directory (jcal format, or LSST outputs with --lsst)")
    p.add_argument("--out", help="output directory")
    p.add_argument("--lsst", action="store_true", help="read LSST pipeline outputs (jcal.io.lsst.read_lsst)")
    p.add_argument("--config", "--configfile", dest="config", action="append", metavar="FILE",
                   help="JSON config file (jointcal or FitConfig names); may repeat")
    p.add_argument("--set", "-c", dest="set", action="append", metavar="KEY=VALUE",
                   help="override one field, dotted for subtasks (sourceSelector.signalToNoiseMin=20)")
    p.add_argument("--no-astrometry", action="store_true")
    p.add_argument("--no-photometry", action="store_true")
    p.add_argument("--wcs-format", choices=WCS_FORMATS,
                   help="output FITS WCS: TAN-SIP in wcs/ (default), TPV in wcs/, or both (TPV in wcs_tpv/)")
    p.add_argument("--show-config", action="store_true", help="print the full task config and exit")
    p.add_argument("--overwrite", "--clobber-output", dest="overwrite", action="store_true",
                   help="replace an existing output directory")
    p.add_argument("--no-backup-config", action="store_true")
    p.add_argument("--doraise", "--traceback", dest="doraise", action="store_true",
                   help="raise on failure (full traceback) instead of a one-line error")
    p.add_argument("--quiet", action="store_true", help="no progress, no warnings: errors only")
    p.add_argument("--report", action="store_true", help="also write the diagnostic report (OUT/report/)")
    return p


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jcal", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    # `jcal fit` is JointcalTask.parseAndRun (intercepted in main); listed here for --help only.
    sub.add_parser("fit", add_help=False,
                   help="fit a directory (JointcalTask.parseAndRun; `jcal fit --help` for options)")

    p = sub.add_parser("simulate", help="write a simulated survey (input format + truth/)")
    p.add_argument("preset", nargs="?", default="small", help=", ".join(PRESETS))
    p.add_argument("out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("demo", help="simulate a survey, write it, read it back, fit it, compare with the truth")
    p.add_argument("--out", default="jcal-demo-out", help="outputs; the input goes to OUT-input beside it")
    p.add_argument("--preset", default="small", help=", ".join(PRESETS))
    p.add_argument("--report", action="store_true", help="also write the diagnostic report (OUT/report/)")

    p = sub.add_parser("report", help="write the diagnostic report (PNG + HTML) of a fit's output directory")
    p.add_argument("out_dir")
    for name in ("simulate", "demo", "report"):
        p = sub.choices[name]
        p.add_argument("--quiet", action="store_true", help="no progress, no warnings: errors only")
        p.add_argument("--traceback", action="store_true", help="show the full traceback of an error")
    return parser


def _setup_logging(quiet: bool) -> None:
    from .progress import TqdmLoggingHandler

    handler = TqdmLoggingHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(name)s: %(levelname)s: %(message)s" if quiet else "%(name)s: %(message)s"))
    handler.setLevel(logging.ERROR if quiet else logging.INFO)  # quiet hides warnings; the outputs record them
    root = logging.getLogger("jcal")
    root.handlers[:] = [handler]
    root.propagate = False
    root.setLevel(logging.WARNING if quiet else logging.INFO)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return _run(argv)
    except KeyboardInterrupt:
        print("jcal: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - turned into one line unless asked for the traceback
        if "--traceback" in argv or "--doraise" in argv:
            raise
        names = {c.__name__ for c in type(exc).__mro__}
        user = isinstance(exc, OSError) or bool(names & _USER_ERRORS)
        text = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__
        if names & _FIT_ERRORS:
            text = f"the fit failed: {text}"
        elif not user:
            text = f"{type(exc).__name__}: {text} (a failure of jcal itself: rerun with --traceback and report it)"
        print(f"jcal: error: {text}", file=sys.stderr)
        return 2 if user else 1


def _run(argv: list[str]) -> int:
    if argv and argv[0] == "fit":  # a thin shell over the Task facade
        if "-h" in argv or "--help" in argv:
            fit_argument_parser().parse_args(argv[1:])  # prints the help, exits
        _setup_logging("--quiet" in argv)
        _keep_freed_memory()
        _configure_jax()
        from .task import JointcalTask
        return JointcalTask.parseAndRun(argv[1:]).exitStatus
    args = _parser().parse_args(argv)
    _setup_logging(args.quiet)
    if args.command != "report":
        _keep_freed_memory()
        _configure_jax()
    if args.command in ("simulate", "demo"):
        preset = args.preset
        if preset not in PRESETS:
            raise UsageError(f"unknown preset {preset!r}{did_you_mean(preset, PRESETS)}; presets: {', '.join(PRESETS)}")
    if args.command == "report":
        return _report(Path(args.out_dir), quiet=args.quiet)
    from .progress import Progress
    progress = Progress(enabled=not args.quiet)
    if args.command == "simulate":
        import jcal
        with progress.step(f"simulating {args.preset}"):
            sim = jcal.simulate(args.preset, seed=args.seed)
        from .io.atomic import overwrite_hint
        with progress.step(f"writing {args.out}"), overwrite_hint("--overwrite"):
            jcal.write_simulation(sim, args.out, overwrite=args.overwrite)
        if not args.quiet:
            print(f"wrote {len(sim.data.sources)} detections to {args.out}")
            print(f"next: jcal fit {args.out} --out {args.out}-fit --report")
        return 0
    from .demo import run_demo
    return run_demo(args.preset, Path(args.out), progress=progress, quiet=args.quiet, report=args.report)


def _keep_freed_memory() -> None:
    """glibc returns every large freed buffer to the OS, and the next step faults the same memory in
    again; on this project's machines that first touch is most of a fit's system time
    (benchmarks/RESULTS.md). The `jcal` process keeps freed memory instead (no mmap for large
    blocks, trim above 1 GiB): a process-wide setting, so the command sets it, the library never.
    JCAL_KEEP_MEMORY=0 turns it off; nothing happens outside glibc."""
    import ctypes
    import os
    if os.environ.get("JCAL_KEEP_MEMORY") == "0" or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-4, 0)  # M_MMAP_MAX: large blocks from the heap, reused after free
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: keep up to 1 GiB of freed heap
    except (OSError, AttributeError):  # not glibc
        pass


def _configure_jax() -> None:
    """After argument parsing (importing JAX would make `--help` slow), before any computation
    (XLA flags only take effect before JAX's first one)."""
    from .jax_setup import configure
    configure()


def _report(out_dir: Path, *, quiet: bool) -> int:
    if not (out_dir / "metrics.json").is_file():
        what = "does not exist" if not out_dir.exists() else "holds no metrics.json (not a jcal fit output)"
        raise FileNotFoundError(f"{out_dir} {what}; give the --out folder of `jcal fit` or `jcal demo`")
    from .progress import Progress
    from .report import make_report
    with Progress(enabled=not quiet).step("writing the report"):
        path = make_report(out_dir)
    print(path)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
