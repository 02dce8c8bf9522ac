"""The simulator's truth is self-consistent and its data look like what it claims (tiny preset)."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest

from jcal.io import read_input
from jcal.simulate import (MONOMIALS, PRESETS, SimConfig, inverse_tangent_plane, read_truth, simulate,
                           tangent_plane, write_simulation)


@pytest.fixture(scope="module")
def sim():
    return simulate("tiny", seed=3)


def _sep_arcsec(ra1, dec1, ra2, dec2):
    dra = ((ra1 - ra2 + 180) % 360 - 180) * np.cos(np.radians(dec2))
    return np.hypot(dra, dec1 - dec2) * 3600.0


def _arrays_equal(a, b):
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, dict):
            assert x.keys() == y.keys()
            for k in x:
                np.testing.assert_array_equal(np.asarray(x[k]), np.asarray(y[k]), err_msg=f"{f.name}[{k}]")
        else:
            np.testing.assert_array_equal(x, y, err_msg=f.name)


def test_tiny_is_fast_and_sized():
    t0 = time.perf_counter()
    s = simulate("tiny")
    assert time.perf_counter() - t0 < 1.0
    assert 1000 < len(s.data.sources) < 10000
    assert len(s.data.visits) == 4 and len(s.data.detector_ids) == 4
    assert len(s.data.ccd_visits) == 16
    assert set(s.data.visits.band) == {"r", "i"}
    assert s.data.visits.epoch.max() - s.data.visits.epoch.min() > 3.0


def test_reproducible_with_seed(sim):
    again = simulate("tiny", seed=3)
    _arrays_equal(sim.data.sources, again.data.sources)
    _arrays_equal(sim.data.refcat, again.data.refcat)
    _arrays_equal(sim.truth.measurements, again.truth.measurements)
    other = simulate("tiny", seed=4)
    assert len(other.data.sources) != len(sim.data.sources) or not np.array_equal(other.data.sources.x,
                                                                                  sim.data.sources.x)


def test_overrides_and_presets():
    assert set(PRESETS) == {"tiny", "small", "medium", "large", "huge", "edge", "edge_small"}
    s = simulate("tiny", n_visits=2, seed=1)
    assert len(s.data.visits) == 2
    with pytest.raises(ValueError, match="unknown preset"):
        simulate("enormous")
    cfg = SimConfig.from_dict(PRESETS["medium"].to_dict())
    assert cfg == PRESETS["medium"]


def test_gnomonic_round_trip():
    rng = np.random.default_rng(0)
    ra0, dec0 = 150.0, -60.0
    xi, eta = rng.uniform(-2, 2, 1000), rng.uniform(-2, 2, 1000)
    ra, dec = inverse_tangent_plane(xi, eta, ra0, dec0)
    xi2, eta2 = tangent_plane(ra, dec, ra0, dec0)
    assert np.max(np.abs(xi2 - xi)) < 1e-12 and np.max(np.abs(eta2 - eta)) < 1e-12


def test_true_map_round_trip(sim):
    t, cfg = sim.truth, sim.config
    rng = np.random.default_rng(0)
    n = 5000
    v = rng.choice(t.visit, n)
    d = rng.choice(t.detector, n)
    x, y = rng.uniform(-0.5, cfg.det_nx - 0.5, n), rng.uniform(-0.5, cfg.det_ny - 0.5, n)
    ra, dec = t.pixel_to_sky(v, d, x, y)
    x2, y2 = t.sky_to_pixel(v, d, ra, dec)
    assert np.max(np.hypot(x2 - x, y2 - y)) < 1e-6


def test_truth_is_in_the_model_family(sim):
    """pixel -> affine -> order-3 polynomial -> TAN reproduces the per-detection truth."""
    t, m = sim.truth, sim.truth.measurements
    assert t.visit_poly.shape == (len(t.visit), 2, len(MONOMIALS)) and t.detector_affine.shape == (4, 2, 3)
    fx, fy = t.pixel_to_focal(m.detector, m.x, m.y)
    ra, dec = np.empty(len(m)), np.empty(len(m))
    for k, v in enumerate(t.visit):
        sel = m.visit == v
        c = t.visit_poly[k]
        mono = np.stack([fx[sel] ** i * fy[sel] ** j for i, j in MONOMIALS])
        ra[sel], dec[sel] = inverse_tangent_plane(c[0] @ mono, c[1] @ mono, t.pointing_ra[k], t.pointing_dec[k])
    assert np.max(_sep_arcsec(ra, dec, m.ra, m.dec)) < 1e-8
    # ... and the star positions at the visit epochs (zero parallax, linear proper motion).
    epoch = sim.data.visits.epoch[np.searchsorted(sim.data.visits.visit, m.visit)]
    sra, sdec = t.stars.position_at(epoch, m.star_id)
    assert np.max(_sep_arcsec(sra, sdec, m.ra, m.dec)) < 1e-8


def test_distortion_amplitude(sim):
    """The radial cubic moves the field corner by ~distortion_edge_arcsec."""
    t, cfg = sim.truth, sim.config
    hx, hy = cfg.half_size_mm
    c = t.visit_poly[0]
    lin = c[:, 1] * hx + c[:, 2] * hy
    cubic = np.array([k[6] * hx ** 3 + k[7] * hx ** 2 * hy + k[8] * hx * hy ** 2 + k[9] * hy ** 3 for k in c])
    assert np.hypot(*cubic) * 3600 == pytest.approx(cfg.distortion_edge_arcsec, rel=1e-6)
    assert np.hypot(*lin) * 3600 / cfg.pixel_scale_arcsec == pytest.approx(np.hypot(hx, hy) / cfg.pixel_size_mm,
                                                                            rel=1e-3)


def test_detections_inside_detectors(sim):
    s, cfg, m = sim.data.sources, sim.config, sim.truth.measurements
    for x, n in ((s.x, cfg.det_nx), (s.y, cfg.det_ny), (m.x, cfg.det_nx), (m.y, cfg.det_ny)):
        assert x.min() >= -0.5 and x.max() <= n - 0.5
    assert np.all(s.inst_flux / s.inst_flux_err >= cfg.min_snr)
    np.testing.assert_array_equal(m.source_id, s.source_id)


def test_centroid_errors_are_honest(sim):
    s, m = sim.data.sources, sim.truth.measurements
    good = ~m.is_outlier
    pull = np.concatenate([(s.x - m.x)[good] / s.x_err[good], (s.y - m.y)[good] / s.y_err[good]])
    assert 0.9 < np.std(pull) < 1.1
    assert s.x_err.min() >= sim.config.centroid_floor_px
    off = np.hypot(s.x - m.x, s.y - m.y)[m.is_outlier] * sim.config.pixel_scale_arcsec
    assert np.all((off > 0.3) & (off < 3.5))


def test_photometry_truth(sim):
    s, t, m = sim.data.sources, sim.truth, sim.truth.measurements
    calib = t.calibration(m.visit, m.detector, m.x, m.y)
    pull = (s.inst_flux - m.true_flux / calib) / s.inst_flux_err
    assert 0.9 < np.std(pull[s.inst_flux / s.inst_flux_err > 20]) < 1.1
    band = sim.data.visits.band[np.searchsorted(sim.data.visits.visit, m.visit)]
    mag = np.where(band == "r", t.stars.mag["r"][m.star_id], t.stars.mag["i"][m.star_id])
    np.testing.assert_allclose(m.true_flux, 10 ** (-0.4 * (mag - 31.4)))
    # Per-ccd centre calibration agrees with the callable; the field stays within its bound.
    cv = t.ccd_visits
    cx, cy = (sim.config.det_nx - 1) / 2, (sim.config.det_ny - 1) / 2
    np.testing.assert_allclose(t.calibration(cv.visit, cv.detector, cx, cy), cv.calib_center)
    assert np.all(np.abs(t.field_coeffs).sum(axis=1) <= sim.config.field_amplitude + 1e-12)


def test_first_guess_wcs_error(sim):
    """The first guess is off by the intended ~0.5-1 arcsec, as recorded in the truth."""
    t, m = sim.truth, sim.truth.measurements
    cv = t.ccd_visits
    assert np.all((cv.wcs_error_rms_arcsec > 0.4) & (cv.wcs_error_rms_arcsec < 1.3))
    for k in range(len(cv.visit)):
        v, d = int(cv.visit[k]), int(cv.detector[k])
        sel = (m.visit == v) & (m.detector == d)
        wcs = sim.data.ccd_visits[(v, d)].wcs
        ra, dec = wcs.all_pix2world(m.x[sel], m.y[sel], 0)
        rms = np.sqrt(np.mean(_sep_arcsec(ra, dec, m.ra[sel], m.dec[sel]) ** 2))
        assert rms == pytest.approx(cv.wcs_error_rms_arcsec[k], abs=0.15)
        assert wcs.wcs.ctype[0] == "RA---TAN-SIP" and wcs.sip is not None


def test_refcat_consistent_with_truth(sim):
    r, st = sim.data.refcat, sim.truth.stars
    assert np.all(r.epoch == 2016.0)
    assert np.all((r.ra_err >= 0.1 - 1e-12) & (r.ra_err <= 1.0 + 1e-12))
    assert np.all(st.mag["r"][r.ref_id] < sim.config.ref_mag_limit)
    cosd = np.cos(np.radians(st.dec[r.ref_id]))
    pulls = {
        "ra": ((r.ra - st.ra[r.ref_id] + 180) % 360 - 180) * cosd * 3.6e6 / r.ra_err,
        "dec": (r.dec - st.dec[r.ref_id]) * 3.6e6 / r.dec_err,
        "pmra": (r.pmra - st.pmra[r.ref_id]) / r.pmra_err,
        "pmdec": (r.pmdec - st.pmdec[r.ref_id]) / r.pmdec_err,
        "r_flux": (r.fluxes["r"][0] - 10 ** (-0.4 * (st.mag["r"][r.ref_id] - 31.4))) / r.fluxes["r"][1],
    }
    for name, p in pulls.items():
        assert 0.7 < np.std(p) < 1.3, name
        assert np.max(np.abs(p)) < 6, name
    assert r.has_proper_motion.all() and set(r.fluxes) == {"r", "i"}


def test_write_simulation_round_trip(sim, tmp_path):
    out = write_simulation(sim, tmp_path / "sim")
    data = read_input(out)
    _arrays_equal(data.sources, sim.data.sources)
    _arrays_equal(data.refcat, sim.data.refcat)
    _arrays_equal(data.visits, sim.data.visits)
    _arrays_equal(data.camera, sim.data.camera)
    assert data.ccd_visits.keys() == sim.data.ccd_visits.keys()
    truth = read_truth(out)
    _arrays_equal(truth.measurements, sim.truth.measurements)
    _arrays_equal(truth.ccd_visits, sim.truth.ccd_visits)
    _arrays_equal(truth.stars, sim.truth.stars)
    np.testing.assert_array_equal(truth.visit_poly, sim.truth.visit_poly)
    np.testing.assert_array_equal(truth.detector_affine, sim.truth.detector_affine)
    assert truth.config == sim.config
    with pytest.raises(FileExistsError):
        write_simulation(sim, out)
