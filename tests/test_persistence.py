"""Any model form is fitted, written and reloaded exactly; saved models evaluate with numpy as with
JAX; a damaged saved model is refused with an error naming the file and the problem."""

import json

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jcal
import jcal_models as jm
from jcal.associate import associate
from jcal.calibration.initialise import initial_astrometric_model
from jcal.calibration.photometry import PhotometricSolution
from jcal_models import extra


@jm.register  # not a Transform subclass: registered by the decorator
class Shear(eqx.Module):
    """(u, v) -> (u + g0 v, v + g1 u), shared by every visit."""

    g: jax.Array

    def __call__(self, u, v):
        return u + self.g[0] * v, v + self.g[1] * u


class ShearedAstrometry(jm.TangentPlaneAstrometry):  # a subclass: registered by being one
    """chip polynomial -> a fixed shear -> visit polynomial -> sky (a user's own form)."""

    chip: jm.Grouped
    shear: Shear
    visit: jm.Grouped
    sky: jm.Grouped
    reference_detector: int = eqx.field(static=True, default=0)

    def tangent(self, x, y):
        return self.visit(*self.shear(*self.chip(x, y)))

    def fix_gauge(self, mask):  # the shear is degenerate with the visits' linear terms: held
        mask = eqx.tree_at(lambda m: m.chip.inner.coeffs, mask,
                           mask.chip.inner.coeffs.at[self.reference_detector].set(0.0))
        return eqx.tree_at(lambda m: m.shear.g, mask, jnp.zeros_like(mask.shear.g))


def _sheared(init):
    return ShearedAstrometry(init.chip, Shear(jnp.array([2e-4, -1e-4])), init.visit, init.sky,
                             init.reference_detector)


FORMS = {"radial": extra.radial_astrometry, "pixel_grid": extra.pixel_grid_astrometry,
         "turbulent": extra.turbulent_astrometry, "test_defined": _sheared}


@pytest.fixture(scope="module")
def tiny():
    sim = jcal.simulate("tiny", seed=5)
    config = jcal.FitConfig(visit_order=3, photometry=False, max_outlier_rounds=2)
    return sim, config, initial_astrometric_model(sim.data, associate(sim.data, config), config)


@pytest.mark.parametrize("name", FORMS)
def test_fit_write_reload_every_form(tiny, name, tmp_path):
    sim, config, init = tiny
    result = jcal.fit(sim.data, config, astrometry_model=FORMS[name](init))
    out = result.write(tmp_path / "out")
    loaded = jcal.load_model(out / "model")
    fitted = result.astrometry.model
    assert type(loaded.model) is type(fitted)
    assert jax.tree.structure(loaded.model) == jax.tree.structure(fitted)
    assert all(jax.tree.leaves(jax.tree.map(lambda a, b: type(a) is type(b) and np.array_equal(a, b),
                                            loaded.model, fitted)))
    for key in ("visits", "detectors", "ccd_visits"):
        np.testing.assert_array_equal(getattr(loaded, key), getattr(result.solution, key))
    visit, detector = result.association.ccd_visits.T
    x, y = np.linspace(0.0, 1000.0, visit.size), np.linspace(900.0, 5.0, visit.size)
    ra, dec = result.pixel_to_sky(visit, detector, x, y)
    ra_jax, dec_jax = loaded.pixel_to_sky(visit, detector, x, y)
    np.testing.assert_array_equal(ra_jax, ra)
    np.testing.assert_array_equal(dec_jax, dec)
    ra_np, dec_np = loaded.pixel_to_sky(visit, detector, x, y, xp=np)  # no JAX: numpy all the way
    assert type(ra_np) is np.ndarray
    assert np.max(np.abs(ra_np - ra)) < 1e-12 and np.max(np.abs(dec_np - dec)) < 1e-12  # deg
    jcal.save_model(result, tmp_path / "again")  # the public API writes the same files
    assert json.loads((tmp_path / "again.json").read_text()) == json.loads((out / "model.json").read_text())
    assert (tmp_path / "again.eqx").read_bytes() == (out / "model.eqx").read_bytes()


def _photometric_solutions():
    """Every photometric form (and one with colour terms) with made-up values and ids."""
    rng = np.random.default_rng(1)
    focal = jm.Grouped(jm.Polynomial(coeffs=jnp.asarray(rng.normal(size=(3, 2, 3))), center=jnp.full((3, 2), 500.0),
                                     half_width=jnp.full((3, 2), 500.0), order=1), by="detector")
    order = 2
    visit_coeffs = rng.normal(scale=0.01, size=(2, jm.n_terms(order)))
    visit_coeffs[:, 0] = 1.0
    center, half = np.zeros((2, 2)), np.full((2, 2), 2.0)
    forms = [jm.simple_flux(rng.uniform(1, 2, 6)), jm.simple_magnitude(rng.uniform(30, 31, 6)),
             jm.constrained_flux(focal, rng.uniform(1, 2, 3), visit_coeffs, center, half, order),
             jm.constrained_magnitude(focal, rng.uniform(0, 1, 3), visit_coeffs, center, half, order)]
    forms.append(jm.WithColourTerms(forms[3], jm.colour_terms(["g"], ["r"], [0.01], [0.1], [0.0], [True])))
    ids = dict(visits=np.array([10, 11]), detectors=np.array([0, 1, 2]),
               ccd_visits=np.array([[v, d] for v in (10, 11) for d in (0, 1, 2)]), bands=("r",),
               visit_band=np.array([0, 0]), band_detectors=np.array([[0, 0], [0, 1], [0, 2]]))
    return [PhotometricSolution(form, **ids) for form in forms]


@pytest.mark.parametrize("solution", _photometric_solutions(), ids=lambda s: type(s.model).__name__)
def test_photometric_models_save_reload_and_evaluate_with_numpy(solution, tmp_path):
    jcal.save_photometric_model(solution, tmp_path / "photometry_model")
    loaded = jcal.load_photometric_model(tmp_path / "photometry_model")
    assert type(loaded.model) is type(solution.model) and loaded.bands == solution.bands
    visit, detector = solution.ccd_visits.T
    x, y = np.linspace(0.0, 1000.0, visit.size), np.linspace(900.0, 5.0, visit.size)
    calib, zero = solution.evaluate(visit, detector, x, y)
    np.testing.assert_array_equal(loaded.evaluate(visit, detector, x, y)[0], calib)
    calib_np, zero_np = loaded.evaluate(visit, detector, x, y, xp=np)
    np.testing.assert_allclose(calib_np, calib, rtol=1e-13)
    np.testing.assert_allclose(zero_np, zero, rtol=0, atol=1e-12)


# -- what cannot be saved, and damaged files ---------------------------------------------------------


def test_an_unregistered_module_cannot_be_saved(tiny, tmp_path):
    class Plain(eqx.Module):  # neither a Transform subclass nor registered
        g: jax.Array

        def __call__(self, u, v):
            return u, v

    model = eqx.tree_at(lambda m: m.shear, _sheared(tiny[2]), Plain(jnp.zeros(2)))
    with pytest.raises(TypeError, match=r"cannot save model.shear: .*Plain is not registered"):
        jm.save_form(tmp_path / "m", model)
    assert not (tmp_path / "m.json").exists() and not (tmp_path / "m.eqx").exists()


@pytest.fixture
def saved(tmp_path):
    """A small saved astrometric solution (constrained form, 2 visits, 3 detectors)."""
    rng = np.random.default_rng(0)
    model = jm.constrained_astrometry(rng.normal(size=(3, 2, 3)), np.zeros((3, 2)), np.ones((3, 2)), 1,
                                      rng.normal(size=(2, 2, 6)), np.zeros((2, 2)), np.ones((2, 2)), 2,
                                      np.array([10.0, 20.0]), np.array([5.0, 6.0]), 0)
    ccd_visits = np.array([[v, d] for v in (7, 9) for d in (0, 1, 2)])
    jcal.AstrometricSolution(model, np.array([7, 9]), np.array([0, 1, 2]), ccd_visits).save(tmp_path / "model")
    return tmp_path / "model"


def _edit(path, change):
    meta = json.loads(path.with_suffix(".json").read_text())
    change(meta)
    path.with_suffix(".json").write_text(json.dumps(meta))


def test_good_file_loads(saved):
    assert jcal.load_model(saved).visits.tolist() == [7, 9]


@pytest.mark.parametrize("change, message", [
    (lambda m: m.update(visits=[9, 7]), r"'visits' must be sorted and unique; entry 1 \(7\) follows 9"),
    (lambda m: m.update(ccd_visits=m["ccd_visits"][::-1]), r"'ccd_visits' must be sorted and unique"),
    (lambda m: m.update(visits=[7, 9, 11]), r"the model has 2 'visit' groups but 'visits' lists 3"),
    (lambda m: m.update(detectors=[0, 1, 5]), r"'ccd_visits' names detector 2, absent from 'detectors'"),
    (lambda m: m.update(visits=["7", 9]), r"'visits' must be a list of integers"),
    (lambda m: m["model"].update(module="somewhere.Unknown"),
     r"model: class 'somewhere.Unknown' is not registered in this process"),
    (lambda m: m["model"]["fields"].pop("chip"), r"model: .*ConstrainedAstrometry declares fields .*missing \['chip'\]"),
    (lambda m: m["model"]["fields"]["chip"]["fields"]["inner"]["fields"]["coeffs"]["array"].update(dtype="object"),
     r"model.chip.inner.coeffs: dtype 'object' is not one of"),
    (lambda m: m["model"]["fields"]["chip"]["fields"]["inner"]["fields"]["coeffs"]["array"].update(shape=[3, 2, 4]),
     r"model.eqx: does not hold the arrays model.json describes"),
    (lambda m: m["model"]["fields"]["sky"]["fields"].update(by="pixel"),
     r"ConstrainedAstrometry.sky must be Grouped\(TangentPlaneToSky\(...\), by='visit'\)"),
    (lambda m: m.update(format="something else"), r"not a jcal model file"),
])
def test_damaged_json_is_named(saved, change, message):
    _edit(saved, change)
    with pytest.raises(jcal.InputError, match=message) as caught:
        jcal.load_model(saved)
    assert str(saved.with_suffix(".json" if "model.eqx" not in message else ".eqx")) in str(caught.value)


def test_invalid_json_names_file_and_line(saved):
    saved.with_suffix(".json").write_text('{"format": "jcal-model",\n "version": 2,,}')
    with pytest.raises(jcal.InputError, match=r"model.json, line 2, column 15: invalid JSON"):
        jcal.load_model(saved)


def test_damaged_eqx_is_named(saved):
    eqx_file = saved.with_suffix(".eqx")
    good = eqx_file.read_bytes()
    eqx_file.write_bytes(good[:100])
    with pytest.raises(jcal.InputError, match=r"model.eqx: 100 bytes, but model.json describes \d+ bytes"):
        jcal.load_model(saved)
    eqx_file.write_bytes(good[: len(good) // 2])
    with pytest.raises(jcal.InputError, match=r"model.eqx: does not hold the arrays model.json describes \(at "
                                              r"\.visit\.inner\.coeffs: "):
        jcal.load_model(saved)
    eqx_file.write_bytes(b"\0" * len(good))
    with pytest.raises(jcal.InputError, match=r"model.eqx: does not hold the arrays model.json describes"):
        jcal.load_model(saved)
    eqx_file.write_bytes(good + b"extra")
    with pytest.raises(jcal.InputError, match=r"model.eqx: has bytes after the arrays"):
        jcal.load_model(saved)
    eqx_file.unlink()
    with pytest.raises(jcal.InputError, match=r"model.eqx: cannot be read"):
        jcal.load_model(saved)


def test_grouped_checks_its_group_axis():
    with pytest.raises(ValueError, match=r"Grouped\(by='visit'\): every array of Polynomial needs the same leading "
                                         r"group axis; leading lengths are .coeffs: 3, .center: 2"):
        jm.Grouped(jm.Polynomial(coeffs=jnp.zeros((3, 2, 3)), center=jnp.zeros((2, 2)), half_width=jnp.ones((3, 2)),
                                 order=1), by="visit")
    with pytest.raises(TypeError, match="abstract"):
        jm.TangentPlaneAstrometry()


def test_a_model_saved_before_format_2_loads_with_like(tmp_path):
    """jcal's earlier files ("structure" + ids, same .eqx layout) load given a model of that form."""
    rng = np.random.default_rng(3)
    model = jm.simple_astrometry(rng.normal(size=(2, 2, 3)), np.zeros((2, 2)), np.ones((2, 2)), 1, np.array([1.0]),
                                 np.array([2.0]))
    ids = {"visits": [4], "detectors": [0, 1], "ccd_visits": [[4, 0], [4, 1]]}
    (tmp_path / "model.json").write_text(json.dumps({"structure": {"form": "simple", "order": 1}, **ids}))
    eqx.tree_serialise_leaves(tmp_path / "model.eqx", model)
    with pytest.raises(jcal.InputError, match=r"saved by jcal before format 2: refit, or load with like="):
        jcal.load_model(tmp_path / "model")
    template = jax.tree.map(jnp.zeros_like, model)
    loaded = jcal.load_model(tmp_path / "model", like=template)
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, loaded.model, model)))
    assert loaded.ccd_visits.tolist() == ids["ccd_visits"]
