"""End to end on simulated surveys whose truth the model family represents exactly."""

import dataclasses
import json

import equinox as eqx
import jax.numpy as jnp
import numpy as np
import pytest

import jcal
import jcal.calibration.initialise
import jcal_models


@pytest.fixture(scope="module")
def small_fit():
    sim = jcal.simulate("small", seed=3)
    result = jcal.fit(sim.data, jcal.FitConfig(visit_order=3, photometry=False))
    return sim, result


def _mapping_error_mas(sim, result):
    a = result.association
    tr = sim.truth.measurements
    rows = a.source_index
    ra, dec = result.pixel_to_sky(tr.visit[rows], tr.detector[rows], tr.x[rows], tr.y[rows])
    tra, tdec = sim.truth.pixel_to_sky(tr.visit[rows], tr.detector[rows], tr.x[rows], tr.y[rows])
    dx = (ra - tra) * np.cos(np.radians(tdec)) * 3.6e6
    dy = (dec - tdec) * 3.6e6
    return float(np.sqrt(np.mean(dx**2 + dy**2) / 2))


def test_fitted_mapping_matches_truth(small_fit):
    sim, result = small_fit
    err = _mapping_error_mas(sim, result)
    first_guess = float(np.mean(sim.truth.ccd_visits.wcs_error_rms_arcsec)) * 1e3
    noise = float(np.median(sim.data.sources.x_err)) * sim.config.pixel_scale_arcsec * 1e3
    print(f"mapping error {err:.3f} mas; first guess {first_guess:.0f} mas; centroid noise {noise:.1f} mas")
    assert first_guess > 300
    assert err < 1.0  # mas, per coordinate RMS at the true pixel positions


def test_chi2_and_outliers(small_fit):
    sim, result = small_fit
    m = result.metrics
    assert 0.95 < m["astrometry_chi2_per_ndof"] < 1.1
    a = result.association
    truth_outlier = sim.truth.measurements.is_outlier[a.source_index]
    rejected = result.astrometry.rejected  # held-out measurements are not rejected
    assert truth_outlier.sum() > 0
    assert (truth_outlier & ~rejected).sum() <= 1  # injected gross outliers found
    assert m["astrometry_converged"]
    # Good detections lost: none in a star of 3+ detections free of outliers and mis-associated
    # detections (an early, biased round may reject some: they are re-admitted at the end). A
    # star of two detections that disagree cannot tell which is wrong and loses both.
    bad = truth_outlier | sim.misassociated(a)
    star_has_bad = np.bincount(a.star, weights=bad, minlength=a.n_stars) > 0
    n_detections = np.bincount(a.star, minlength=a.n_stars)
    lost = rejected & ~bad
    clean_lost = lost & ~star_has_bad[a.star] & (n_detections[a.star] > 2)
    print(f"\nrejected {rejected.sum()} of {len(rejected)}: {bad.sum()} outliers or mis-associations, good "
          f"lost {lost.sum()} ({clean_lost.sum()} in clean stars of 3+ detections)")
    assert clean_lost.sum() <= 2


def test_outlier_free_chi2_close_to_one():
    sim = jcal.simulate("tiny", seed=5, outlier_fraction=0.0, star_density_scale=1.0) \
        if "star_density_scale" in jcal.SimConfig.__dataclass_fields__ else jcal.simulate("tiny", seed=5, outlier_fraction=0.0)
    result = jcal.fit(sim.data, jcal.FitConfig(visit_order=3, photometry=False))
    chi2n = result.metrics["astrometry_chi2_per_ndof"]
    assert 0.9 < chi2n < 1.1
    assert result.metrics["astrometry_outliers"] <= 0.01 * len(result.association.star)


class _VisitsFirst(jcal_models.ConstrainedAstrometry):
    """The constrained form with jointcal's visits-only first stage (detectors held)."""

    def first_stage(self, mask):
        return eqx.tree_at(lambda m: m.chip.inner.coeffs, mask, jnp.zeros_like(mask.chip.inner.coeffs))


def _fit_tiny_twice(form: type):
    """The tiny survey fitted with the constrained form, and again starting from the same model
    cast to `form`."""
    sim = jcal.simulate("tiny", seed=5)
    config = jcal.FitConfig(astrometry_model="constrained", visit_order=3, photometry=False)
    plain = jcal.fit(sim.data, config)
    start = jcal.calibration.initialise.initial_astrometric_model(sim.data, plain.association, config)
    other = jcal.fit(sim.data, config, astrometry_model=form(**{
        f.name: getattr(start, f.name) for f in dataclasses.fields(start)}))
    return plain, other


def _assert_same_fit(a, b):
    """Same outliers and chi2, and maps within 0.01 mas of each other."""
    assert a.metrics["astrometry_outliers"] == b.metrics["astrometry_outliers"]
    np.testing.assert_allclose(a.metrics["astrometry_final_chi2"], b.metrics["astrometry_final_chi2"], rtol=1e-6)
    visit, detector = a.association.ccd_visits.T
    ra0, dec0 = a.pixel_to_sky(visit, detector, 100.0, 200.0)
    ra1, dec1 = b.pixel_to_sky(visit, detector, 100.0, 200.0)
    assert np.max(np.hypot((ra0 - ra1) * np.cos(np.radians(dec0)), dec0 - dec1)) * 3.6e6 < 0.01  # mas


def test_constrained_form_needs_no_visits_stage():
    """jointcal first fits the visit terms alone. With stars held the mapping stage is linear in
    the constrained form's coefficients, so jcal starts with all mappings: same optimum."""
    plain, staged = _fit_tiny_twice(_VisitsFirst)
    assert "visits" not in plain.metrics["astrometry_stage_seconds"]
    assert "visits" in staged.metrics["astrometry_stage_seconds"]
    _assert_same_fit(plain, staged)


class _ThroughSky(jcal_models.ConstrainedAstrometry):
    """The constrained form with its own `__call__`: fitted through (ra, dec), in the plane
    tangent at each star, instead of in the visit's tangent plane."""

    def __call__(self, x, y):
        return self.sky(*self.visit(*self.chip(x, y)))


def test_tangent_plane_residuals_fit_as_through_the_sky():
    """Residuals in the visit's tangent plane (whitened there) give the fit that residuals taken
    through (ra, dec) give: same outliers, chi2 and map."""
    plane, sky = _fit_tiny_twice(_ThroughSky)
    assert plane.astrometry.model.compares_in_tangent_plane
    assert not sky.astrometry.model.compares_in_tangent_plane
    _assert_same_fit(plane, sky)


def test_write_outputs_and_reload(small_fit, tmp_path):
    sim, result = small_fit
    out = result.write(tmp_path / "out")
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("astrometry_collected_refStars", "astrometry_prepared_refStars", "astrometry_matched_fittedStars",
                "astrometry_prepared_fittedStars", "astrometry_prepared_ccdImages", "astrometry_final_chi2",
                "astrometry_final_ndof"):
        assert key in metrics
    assert len(list((out / "wcs").glob("*.fits"))) == len(result.association.ccd_visits)
    assert metrics["timings"]["wcs_approximation_worst_rms_mas"] < 0.1
    model = jcal.load_model(out / "model")
    v, d = result.association.ccd_visits[3]
    np.testing.assert_allclose(model.pixel_to_sky(v, d, [5.0, 900.0], [7.0, 11.0]),
                               result.pixel_to_sky(v, d, [5.0, 900.0], [7.0, 11.0]), atol=1e-12)
    from astropy.io import fits
    from astropy.wcs import WCS
    w = WCS(fits.getheader(out / "wcs" / f"{v}_{d}.fits"))
    ra, dec = w.all_pix2world([5.0, 900.0], [7.0, 11.0], 0)
    ra2, dec2 = result.pixel_to_sky(v, d, [5.0, 900.0], [7.0, 11.0])
    assert np.max(np.abs(dec - dec2)) * 3.6e6 < 0.1
    with pytest.raises(FileExistsError):
        result.write(tmp_path / "out")


def test_simple_model_fits_and_underdetermined_order_is_named():
    sim = jcal.simulate("tiny", seed=6)
    with pytest.raises(jcal.SingularSystemError, match=r"ccd_visit 3 \(14 residuals for 20 parameters\)"):
        # jointcal's association (no stars seen once, no alignment, nothing held out): too few residuals
        jcal.fit(sim.data, jcal.FitConfig(astrometry_model="simple", simple_order=3, photometry=False,
                                          reference_counts=False, align_radius_arcsec=0.0, holdout_fraction=0.0))
    sim = jcal.simulate("small", seed=6)  # enough stars per detector-visit for order 3
    result = jcal.fit(sim.data, jcal.FitConfig(astrometry_model="simple", simple_order=3, photometry=False))
    assert 0.9 < result.metrics["astrometry_chi2_per_ndof"] < 1.15


def test_sky_covariance_at_pixels(small_fit):
    sim, result = small_fit
    v, d = result.association.ccd_visits[5]
    cov = result.sky_covariance(v, d, [10.0, 500.0], [20.0, 500.0])
    assert cov.shape == (2, 2, 2)
    sigma = np.sqrt(np.diagonal(cov, axis1=1, axis2=2))
    assert np.all(sigma > 0.01) and np.all(sigma < 5.0)  # mas: well below the centroid noise
    assert sigma[0].mean() > sigma[1].mean()  # the detector corner is less constrained than its centre
    np.testing.assert_allclose(cov, np.transpose(cov, (0, 2, 1)), atol=1e-12)
