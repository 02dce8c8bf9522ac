"""Colour terms in the photometric fit: a simulated survey whose reference catalog bands differ
from the instrument bands by c1 x colour (jointcal/LSST Colorterm semantics)."""

import dataclasses
import json

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pyarrow.parquet as pq
import pytest

import jcal
import jcal_models as jm
from jcal.associate import associate
from jcal.calibration.photometry import fit_photometry, instrument_value, load_photometric_model, magnitude_residual
from jcal.config import ConfigError, FitConfig
from jcal.data import InputError
from jcal.simulate import read_truth, simulate, write_simulation
from jcal.task import JointcalConfig

INJECTED = {"r": 0.1, "i": -0.08}  # c1 per band; colour r - i for r, i - r for i (the simulator's convention)
TERMS = {"r": {"primary": "r", "secondary": "i"}, "i": {"primary": "i", "secondary": "r"}}
FIXED = {b: dict(t, c1=INJECTED[b]) for b, t in TERMS.items()}
BASE = FitConfig(photometry_visit_order=1)  # tiny: 2 x 2 detectors, a plane per visit is plenty
SIM = dict(n_visits=8, bands=("r", "i"))


# ------------------------------------------------------------------------------ helpers


def _zero_point_offset_mmag(fit, sim, assoc) -> dict[str, float]:
    """Per band: median fitted - true calibration (mmag) at the true pixels of the measurements,
    i.e. the error of the absolute zero point (what a colour term biases)."""
    rows = assoc.source_index
    src, tm = sim.data.sources, sim.truth.measurements
    true = sim.truth.calibration(src.visit[rows], src.detector[rows], tm.x[rows], tm.y[rows])
    fitted = fit.calibration(src.visit[rows], src.detector[rows], tm.x[rows], tm.y[rows])
    d = 2500.0 * np.log10(fitted / true)
    return {band: float(np.median(d[fit.measurement_band == b])) for b, band in enumerate(fit.bands)}


def _reference_colour(data, assoc, band, stars):
    """Primary mag and primary - secondary colour of the reference stars matched to `stars`."""
    secondary = TERMS[band]["secondary"]
    r = assoc.star_ref[stars]
    fp, fs = data.refcat.fluxes[band][0][r], data.refcat.fluxes[secondary][0][r]
    return 31.4 - 2.5 * np.log10(fp), -2.5 * np.log10(fp / fs)


def _reference_residual_slope(fit, data, assoc, band, c1=0.0) -> float:
    """Slope vs colour of fitted star mag - (reference mag + c1 colour) over the band's reference stars."""
    b = fit.bands.index(band)
    stars = np.flatnonzero(fit.has_reference[:, b] & (fit.star_weights > 0))
    mag, colour = _reference_colour(data, assoc, band, stars)
    residual = fit.star_columns()[f"mag_{band}"][stars] - (mag + c1 * colour)
    return float(np.polyfit(colour, residual, 1)[0])


def _mean_reference_colour(fit, data, assoc, band) -> float:
    b = fit.bands.index(band)
    return float(np.mean(_reference_colour(data, assoc, band, np.flatnonzero(fit.has_reference[:, b]))[1]))


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def plain():
    """tiny, 8 visits in r and i, no colour term: the no-colour-term reference level."""
    sim = simulate("tiny", **SIM)
    assoc = associate(sim.data, FitConfig())
    return sim, assoc, fit_photometry(sim.data, assoc, BASE)


@pytest.fixture(scope="module")
def coloured():
    """The same survey with colour terms injected: reference bands = instrument bands - c1 x colour."""
    sim = simulate("tiny", colour_terms=(INJECTED["r"], INJECTED["i"]), **SIM)
    return sim, associate(sim.data, FitConfig())


@pytest.fixture(scope="module")
def ignored(coloured):
    sim, assoc = coloured
    return fit_photometry(sim.data, assoc, BASE)


@pytest.fixture(scope="module")
def fitted(coloured):
    sim, assoc = coloured
    return fit_photometry(sim.data, assoc, BASE.replace(colour_terms=TERMS, fit_colour_terms=True))


# ------------------------------------------------------------------------------ model and simulator


def test_colour_term_enters_through_the_star_and_autodiff():
    """instrument_value: s' + delta for colour-transformed stars, s otherwise; d r / d c1 by autodiff."""
    terms = jm.colour_terms(["r", ""], ["i", ""], [0.02, 0.0], [0.1, 0.0], [0.01, 0.0], [True, False])
    model = jm.WithColourTerms(jm.simple_magnitude(jnp.array([30.0, 30.1])), terms)
    view = jm.gather(model, {"ccd_visit": jnp.asarray(1)})
    star = jm.PhotometricStars(value=jnp.array([20.0, 19.5]), kind="magnitude")
    m = {"x": 1.0, "y": 2.0, "band": jnp.asarray(0), "colour": 0.4, "colour_on": 1.0, "inst_mag": -10.0,
         "sigma": 0.02}
    assert float(instrument_value(view, star, m)) == pytest.approx(20.0 + 0.02 + 0.1 * 0.4 + 0.01 * 0.16)
    assert float(instrument_value(view, star, dict(m, colour_on=0.0))) == pytest.approx(20.0)
    assert view(1.0, 2.0) == 30.1 and model.kind == "magnitude"  # the calibration is the base form's
    grad = jax.grad(lambda v: magnitude_residual(v, star, m)[0])(view)
    assert float(grad.colour.slope[0]) == pytest.approx(-0.4 / 0.02)  # r = (inst + z - s' - delta) / sigma
    assert float(grad.colour.slope[1]) == 0.0
    ones = jax.tree.map(jnp.ones_like, eqx.filter(model, jm.parameter_filter(model)))
    np.testing.assert_array_equal(np.asarray(model.fix_gauge(ones).colour.slope), [1.0, 0.0])  # band 2: no term
    assert model.first_stage(ones) is None  # simple forms have no first stage, with or without colour terms


def test_simulated_colour_terms_and_truth_files(tmp_path):
    sim = simulate("tiny", n_visits=2, bands=("r", "i"), colour_terms=(0.1, -0.08))
    s = sim.truth.stars
    np.testing.assert_allclose(s.mag["r"] - s.ref_mag["r"], 0.1 * (s.ref_mag["r"] - s.ref_mag["i"]), atol=1e-12)
    np.testing.assert_allclose(s.mag["i"] - s.ref_mag["i"], -0.08 * (s.ref_mag["i"] - s.ref_mag["r"]), atol=1e-12)
    rows = np.searchsorted(s.id, sim.data.refcat.ref_id)  # the refcat follows the reference bands
    ref_mag = 31.4 - 2.5 * np.log10(sim.data.refcat.fluxes["r"][0])
    assert np.median(np.abs(ref_mag - s.ref_mag["r"][rows])) < 0.01 < np.median(np.abs(ref_mag - s.mag["r"][rows]))
    write_simulation(sim, tmp_path / "sim")
    back = read_truth(tmp_path / "sim")
    np.testing.assert_array_equal(back.stars.ref_mag["i"], s.ref_mag["i"])
    assert back.config.colour_terms == (0.1, -0.08)
    meta = json.loads((tmp_path / "sim" / "truth" / "config.json").read_text())
    assert meta["colour_terms"]["r"] == {"primary": "r", "secondary": "i", "c1": 0.1}
    assert simulate("tiny", n_visits=2).truth.stars.ref_mag is None  # default: no colour term


# ------------------------------------------------------------------------------ fits


def test_ignoring_the_colour_term_biases_the_zero_point(plain, coloured, ignored):
    """(a) Reference magnitudes off by c1 x colour pull the zero point by c1 x <colour> and leave
    reference residuals that trend with colour."""
    sim, assoc = coloured
    base = _zero_point_offset_mmag(plain[2], plain[0], plain[1])
    offset = _zero_point_offset_mmag(ignored, sim, assoc)
    for band, c1 in INJECTED.items():
        expected = 1000.0 * c1 * _mean_reference_colour(ignored, sim.data, assoc, band)
        slope = _reference_residual_slope(ignored, sim.data, assoc, band)
        print(f"\ncolour term ignored, band {band}: zero point off by {offset[band]:.2f} mmag (c1 <colour> = "
              f"{expected:.1f} mmag; no colour term: {base[band]:.2f}); reference residual slope vs colour "
              f"{slope:.4f} (c1 {c1})")
        assert abs(base[band]) < 2.0
        assert abs(offset[band]) > 15.0 and 0.6 < offset[band] / expected < 1.2
        assert 0.5 * abs(c1) < abs(slope) < 1.1 * abs(c1) and np.sign(slope) == np.sign(c1)
    assert ignored.chi2 / ignored.ndof > plain[2].chi2 / plain[2].ndof + 0.05


def test_fitted_colour_term_recovers_the_injected_coefficient(plain, coloured, ignored, fitted):
    """(b) c1 fitted per band: recovered within 3 sigma, the zero-point error and chi2/ndof back to
    the no-colour-term level, no colour trend left in the transformed reference residuals."""
    sim, assoc = coloured
    base = _zero_point_offset_mmag(plain[2], plain[0], plain[1])
    offset = _zero_point_offset_mmag(fitted, sim, assoc)
    terms = fitted.metrics()["photometry_colour_terms"]
    for band, c1 in INJECTED.items():
        t = terms[band]
        mean_colour = _mean_reference_colour(fitted, sim.data, assoc, band)
        zp_sigma = 1000.0 * t["c1_err"] * abs(mean_colour)  # what the c1 error does to the zero point
        slope = _reference_residual_slope(fitted, sim.data, assoc, band, t["c1"])
        print(f"\ncolour term fitted, band {band}: c1 = {t['c1']:.4f} +- {t['c1_err']:.4f} (injected {c1}, "
              f"pull {(t['c1'] - c1) / t['c1_err']:.2f}) from {t['n_reference_stars']} reference stars; zero "
              f"point off by {offset[band]:.2f} mmag (+- {zp_sigma:.1f} from c1; no colour term "
              f"{base[band]:.2f}, ignored {_zero_point_offset_mmag(ignored, sim, assoc)[band]:.2f}); residual "
              f"slope {slope:.5f}")
        assert t["fitted"] and t["primary"] == band and t["c0"] == 0.0
        assert 0 < t["c1_err"] < 0.02 and abs(t["c1"] - c1) < 3 * t["c1_err"]
        assert abs(offset[band]) < abs(base[band]) + 1.0 + 3 * zp_sigma
        assert abs(slope) < 0.005
    chi2 = fitted.chi2 / fitted.ndof
    assert abs(chi2 - plain[2].chi2 / plain[2].ndof) < 0.01
    assert fitted.counts["reference_without_colour"] == 0
    # reported star magnitudes are in the instrument band: no colour trend against the truth
    b = fitted.bands.index("r")
    stars = np.flatnonzero(fitted.has_reference[:, b])
    true_rows = np.searchsorted(sim.truth.stars.id, sim.data.refcat.ref_id[assoc.star_ref[stars]])
    colour = _reference_colour(sim.data, assoc, "r", stars)[1]
    error = fitted.star_columns()["mag_r"][stars] - sim.truth.stars.mag["r"][true_rows]
    assert abs(np.polyfit(colour, error, 1)[0]) < 0.01


def test_fixed_colour_terms_from_config_reproduce_the_injected_ones(plain, coloured, tmp_path):
    """(c) c1 given in the config (not fitted), through jcal.fit and the written outputs; 5 reference
    stars lose their secondary flux and with it their reference constraint in that band."""
    sim, assoc = coloured
    refcat = sim.data.refcat
    i_flux, i_err = (np.array(a, float) for a in refcat.fluxes["i"])
    dropped = np.flatnonzero(np.isin(np.arange(len(i_flux)), assoc.star_ref))[:5]
    i_flux[dropped] = np.nan
    data = dataclasses.replace(sim.data, refcat=dataclasses.replace(refcat, fluxes={**refcat.fluxes,
                                                                                    "i": (i_flux, i_err)}))
    config = BASE.replace(astrometry=False, colour_terms=FIXED)
    result = jcal.fit(data, config)
    fit = result.photometry
    base = _zero_point_offset_mmag(plain[2], plain[0], plain[1])
    offset = _zero_point_offset_mmag(fit, sim, result.association)
    terms = fit.metrics()["photometry_colour_terms"]
    print(f"\nfixed colour terms: zero point off by {offset} mmag (no colour term {base}); "
          f"{fit.counts['reference_without_colour']} reference star(s) without a colour")
    for band, c1 in INJECTED.items():
        assert terms[band]["c1"] == c1 and terms[band]["c1_err"] == 0.0 and not terms[band]["fitted"]
        assert abs(offset[band] - base[band]) < 1.5
    assert 1 <= fit.counts["reference_without_colour"] <= 5
    out = result.write(tmp_path / "out")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["photometry_colour_terms"]["r"]["c1"] == 0.1
    assert metrics["photometry_reference_without_colour"] == fit.counts["reference_without_colour"]
    assert {"mag_r", "mag_r_err", "mag_i"} <= set(pq.read_schema(out / "stars.parquet").names)
    loaded = load_photometric_model(out / "photometry_model")
    assert loaded.colour_terms() == fit.solution.colour_terms()
    assert loaded.colour_terms()["i"] == {"primary": "i", "secondary": "r", "c0": 0.0, "c1": -0.08, "c1_err": 0.0,
                                          "c2": 0.0, "fitted": False}
    v, d = result.association.ccd_visits[:, 0], result.association.ccd_visits[:, 1]
    np.testing.assert_array_equal(loaded.calibration(v, d, 100.0, 200.0), fit.calibration(v, d, 100.0, 200.0))


def test_degenerate_colour_terms_fail_clearly(coloured):
    """(d) What cannot determine c1, or cannot be transformed, is named before any fitting."""
    sim, assoc = coloured
    with pytest.raises(InputError, match="secondary band 'z'.*reference catalog has \\['i', 'r'\\]"):
        fit_photometry(sim.data, assoc, BASE.replace(colour_terms={"r": {"primary": "r", "secondary": "z"}}))
    # every reference star of one colour: c1 x colour is a constant, the zero points' own freedom
    refcat = sim.data.refcat
    r_flux, r_err = refcat.fluxes["r"]
    same_colour = dataclasses.replace(refcat, fluxes={"r": (r_flux, r_err), "i": (1.3 * r_flux, 1.3 * r_err)})
    data = dataclasses.replace(sim.data, refcat=same_colour)
    with pytest.raises(InputError, match="cannot fit the colour term of band 'i'.*degenerate with the zero points"):
        fit_photometry(data, assoc, BASE.replace(colour_terms=TERMS, fit_colour_terms=True))
    with pytest.raises(ConfigError, match="fit_colour_terms.*needs colour_terms"):
        FitConfig(fit_colour_terms=True)
    with pytest.raises(ConfigError, match="band 'r': unknown key\\(s\\) \\['c3'\\]"):
        FitConfig(colour_terms={"r": {"primary": "r", "secondary": "i", "c3": 0.1}})
    with pytest.raises(ConfigError, match="primary and secondary are both 'r'"):
        FitConfig(colour_terms={"r": {"primary": "r", "secondary": "r"}})


def test_task_colorterms_reach_the_fit_config():
    config = JointcalConfig()
    config.colorterms = {"data": {"hsc*": {"data": {"r": {"primary": "r", "secondary": "i", "c1": 0.05}}}}}
    config.fitColorterms = True
    fit_config = config.toFitConfig()
    assert fit_config.colour_terms == {"r": {"primary": "r", "secondary": "i", "c0": 0.0, "c1": 0.05, "c2": 0.0}}
    assert fit_config.fit_colour_terms
    flat = JointcalConfig()
    flat.applyOverride("colour_terms", '{"g": {"primary": "g", "secondary": "r", "c0": 0.01}}')
    assert flat.toFitConfig().colour_terms["g"]["c0"] == 0.01
