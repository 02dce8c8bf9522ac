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
