"""The diagnostic report on a tiny fit: every figure written, non-trivial, referenced."""

import numpy as np
import pytest

import jcal
from jcal.report import make_report, residual_correlation


@pytest.fixture(scope="module")
def fit_dir(tmp_path_factory):
    sim = jcal.simulate("tiny", seed=1)
    result = jcal.fit(sim.data, jcal.FitConfig(visit_order=3, photometry=False))
    out = tmp_path_factory.mktemp("fit") / "out"
    result.write(out)
    return out


def test_report_images(fit_dir):
    from PIL import Image
    index = make_report(fit_dir)
    assert index == fit_dir / "report" / "index.html"
    text = index.read_text()
    pngs = sorted((fit_dir / "report").glob("*.png"))
    names = {p.name for p in pngs}
    assert {"hist_normalised.png", "chi2_ccd_visit.png", "residual_vs_mag.png", "correlation.png",
            "chi2_history.png"} <= names
    assert any(n.startswith("quiver_visit_") for n in names)
    for p in pngs:
        assert p.stat().st_size > 1024
        pix = np.asarray(Image.open(p))
        assert pix.std() > 0, p.name
        assert f"src='{p.name}'" in text
    assert "photometr" in text.lower()  # the note that photometry is absent
    assert not list(fit_dir.glob(".report.tmp-*"))  # atomic: no leftovers
    make_report(fit_dir)  # re-running replaces it


def test_summary_agrees_with_metrics_and_chi2(fit_dir):
    """The page opens with figures that agree with metrics.json and with each other: the
    normalised residuals (leave-one-out, the errors and dof of chi2) have the spread chi2/ndof
    says, and every headline number on the page is the one in summary.json."""
    import json
    import re

    import pyarrow.parquet as pq

    from jcal.report import normalised_residuals
    from jcal.report_summary import constrained

    index = make_report(fit_dir)
    metrics = json.loads((fit_dir / "metrics.json").read_text())
    s = json.loads((fit_dir / "report" / "summary.json").read_text())
    a = s["astrometry"]
    assert a["chi2_per_ndof"] == metrics["astrometry_chi2_per_ndof"]
    assert a["outliers"] == metrics["astrometry_outliers"]
    assert s["counts"]["detector_visits"] == metrics["astrometry_prepared_ccdImages"]
    assert s["warnings"] == metrics["warnings"]
    meas = {k: np.asarray(v) for k, v in pq.read_table(fit_dir / "measurements.parquet").to_pydict().items()}
    use = constrained(meas)
    rms = np.sqrt(np.mean(np.concatenate([meas["residual_ra_mas"][use], meas["residual_dec_mas"][use]]) ** 2))
    assert a["rms_mas"] == pytest.approx(rms, rel=1e-12)
    assert set(a["per_visit"]) == {str(v) for v in np.unique(meas["visit"])}
    nx, ny = normalised_residuals(meas)
    spread = np.sqrt(np.mean(np.concatenate([nx[use], ny[use]]) ** 2))
    assert spread == pytest.approx(np.sqrt(metrics["astrometry_chi2_per_ndof"]), rel=0.1)
    text = index.read_text()
    assert text.index("astrometric RMS") < text.index("<img")  # the summary comes first
    shown = dict(re.findall(r"data-key='([\w.]+)'>([^<]*)<", text))
    assert shown["astrometry.rms_mas"] == f"{a['rms_mas']:.3g}"
    assert shown["astrometry.chi2_per_ndof"] == f"{a['chi2_per_ndof']:.4g}"


def test_correlation_of_coherent_field():
    rng = np.random.default_rng(0)
    u, v = rng.uniform(0, 1, (2, 2000))
    rx, ry = np.ones(2000), np.zeros(2000)  # a constant field: <r1.r2> = 1 at all separations
    _, xi = residual_correlation(u, v, rx, ry, np.zeros(2000, int), 0.5)
    ok = xi["pairs"] > 0
    assert np.allclose(xi["xi_plus"][ok], 1.0)
    _, xi = residual_correlation(u, v, rng.normal(size=2000), rng.normal(size=2000), np.zeros(2000, int), 0.5)
    assert np.all(np.abs(xi["xi_plus"][xi["pairs"] > 500]) < 0.2)


def test_eb_modes_separate_a_gradient_field_from_a_curl_field():
    """A curl-free residual field has B ~ 0; rotating every vector by 90 degrees swaps E and B."""
    from jcal.report import residual_correlation

    rng = np.random.default_rng(0)
    u, v = rng.uniform(0, 1, 6000), rng.uniform(0, 1, 6000)
    k = rng.normal(0, 6.0, (40, 2))
    phase = rng.uniform(0, 2 * np.pi, 40)
    arg = np.outer(u, k[:, 0]) + np.outer(v, k[:, 1]) + phase  # potential = sum cos(k.x + phase)
    gx, gy = -(np.sin(arg) * k[:, 0]).sum(1), -(np.sin(arg) * k[:, 1]).sum(1)
    group = np.zeros(len(u), int)
    _, grad = residual_correlation(u, v, gx, gy, group, 0.3)
    _, curl = residual_correlation(u, v, -gy, gx, group, 0.3)
    small = slice(0, 6)
    assert np.all(np.abs(grad["xi_B"][small]) < 0.2 * np.abs(grad["xi_E"][small]))
    assert np.all(np.abs(curl["xi_E"][small]) < 0.2 * np.abs(curl["xi_B"][small]))


def test_summary_shows_held_out_metrics_when_present_and_warnings():
    """Held-out residuals appear under whatever key the fit gives them; absent, nothing fails."""
    from jcal.report_summary import page, summary

    n = 6
    meas = {"visit": np.array([1, 1, 1, 2, 2, 2]), "detector": np.zeros(n, int), "star": np.array([0, 1, 2, 0, 1, 3]),
            "residual_ra_mas": np.array([1.0, -1.0, 2.0, -1.0, 1.0, 0.0]), "residual_dec_mas": np.ones(n),
            "chi2": np.ones(n), "chi2_deleted": np.array([2.0, 2.0, 2.0, 2.0, 2.0, 0.0]),
            "outlier": np.zeros(n, bool)}
    metrics = {"astrometry_chi2_per_ndof": 1.0, "astrometry_held_out": {"rms_mas": 4.25, "n": 12},
               "warnings": ["1 detector-visit(s) ...: (visit=2, detector=0)"]}
    s = summary(meas, metrics)
    assert s["held_out"] == {"astrometry_held_out.rms_mas": 4.25, "astrometry_held_out.n": 12}
    assert s["astrometry"]["unconstrained"] == 1 and s["astrometry"]["constrained"] == 5
    text = page("out", s, [], [])
    assert "4.25" in text and "(visit=2, detector=0)" in text
    assert summary(meas, {})["held_out"] == {}


def test_held_out_measurements_get_their_own_figures():
    """Measurements held out of the fit are not counted as in-fit residuals; jcal's `holdout`
    metrics are shown with readable labels and per visit beside the in-fit RMS."""
    from jcal.report_summary import page, summary

    meas = {"visit": np.array([1, 1, 1, 2, 2, 2]), "detector": np.zeros(6, int), "star": np.array([0, 0, 1, 2, 2, 3]),
            "residual_ra_mas": np.array([1.0, -1.0, 30.0, -1.0, 1.0, 30.0]), "residual_dec_mas": np.ones(6),
            "chi2": np.ones(6), "chi2_deleted": np.full(6, 2.0), "outlier": np.zeros(6, bool),
            "held_out": np.array([False, False, True, False, False, True])}
    metrics = {"holdout": {"stars": 2, "astrometry_rms_mas": 21.2,
                           "per_visit": {"1": {"rms_mas": 21.0}, "2": {"rms_mas": 21.4}}}}
    s = summary(meas, metrics)
    assert s["astrometry"]["constrained"] == 4 and s["astrometry"]["rms_mas"] == 1.0  # the 30 mas rows are held out
    assert s["astrometry"]["unconstrained"] == 0
    assert s["astrometry"]["per_visit"][2]["held_out_rms_mas"] == 21.4
    text = page("out", s, [], [])
    assert "held-out astrometric RMS per coordinate [mas]" in text and "21.4" in text
