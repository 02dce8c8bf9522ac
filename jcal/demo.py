"""`jcal demo`: simulate a survey, write it in the input format beside the output, read it back,
fit it, write the outputs, and print the fit's error against the simulated truth and what to run
next."""

from __future__ import annotations

from pathlib import Path

from .progress import Progress

__all__ = ["run_demo"]


def demo_input_dir(out: Path) -> Path:
    """Where the demo keeps its input: `OUT-input` beside `OUT`."""
    return out.with_name(out.name + "-input")


def run_demo(preset: str, out: Path, *, progress: Progress, quiet: bool = False, report: bool = False) -> int:
    import jcal
    from .truth import mapping_error_mas, photometric_error_mmag

    input_dir = demo_input_dir(out)
    if input_dir.exists() and not (input_dir / "truth").is_dir():  # only a previous demo's input is replaced
        raise FileExistsError(f"{input_dir} exists and is not a jcal simulation; move it or choose another --out")
    with progress.step(f"simulating the {preset} survey"):
        sim = jcal.simulate(preset, seed=0)
    with progress.step(f"writing its input files to {input_dir}"):
        jcal.write_simulation(sim, input_dir, overwrite=True)
    with progress.step("reading them back"):
        data = jcal.read_input(input_dir)
    # The simulated field is quadratic; a per-visit photometric field of order 7 (36 terms) overfits
    # the small survey's ~600 informative measurements per visit: 9.0 mmag from the truth and 3
    # detector-visits whose calibration swings at the focal plane's corners, against 2.1 mmag at
    # order 3 (benchmarks/demo_photometry_order.py).
    config = jcal.FitConfig(visit_order=3, photometry_visit_order=3)
    result = jcal.fit(data, config, progress=progress)
    with progress.step(f"writing {out}", total=len(result.association.ccd_visits)) as update:
        result.write(out, overwrite=True, progress=update)
    if report:
        from .report import make_report
        with progress.step("writing the report"):
            page = make_report(out)
    if quiet:
        return 0
    m = result.metrics
    print(f"astrometry: chi2/ndof = {m['astrometry_chi2_per_ndof']:.4f}, {m['astrometry_outliers']} outliers; "
          f"error against the simulated truth: {mapping_error_mas(sim, result):.3f} mas RMS per coordinate")
    if result.photometry is not None:
        print(f"photometry: chi2/ndof = {m['photometry_final_chi2'] / max(m['photometry_final_ndof'], 1):.4f}; "
              f"calibration error against the truth: {photometric_error_mmag(sim, result):.2f} mmag RMS")
    print(f"wrote {out} (input in {input_dir}, truth in {input_dir / 'truth'})")
    if report:
        print(f"next: open {page} in a browser")
    else:
        print(f"next: jcal report {out}   (then open {out / 'report' / 'index.html'})")
    return 0
