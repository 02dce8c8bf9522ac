"""The FITS WCS files a fit writes, as any reader takes them: TAN-SIP (and TPV) with CRPIX at the
tangent point's pixel, no distortion term of order 0 or 1, the TAN part alone within 15" of the
full WCS at each detector centre, astropy's evaluation within the recorded JCAL_MAX of the exact
model, and no FITSFixedWarning on opening."""

import warnings

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

import jcal
from jcal.io.sip import tan_part
from test_sip import low_order_distortion_terms, separation_mas


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    sim = jcal.simulate("tiny", seed=2)
    result = jcal.fit(sim.data, jcal.FitConfig(visit_order=3, photometry=False, wcs_format="both"))
    out = tmp_path_factory.mktemp("wcs") / "out"
    result.write(out)
    return result, out


@pytest.mark.parametrize("folder", ["wcs", "wcs_tpv"])
def test_every_output_wcs_is_standard(fitted, folder):
    result, out = fitted
    files = sorted((out / folder).glob("*.fits"))
    assert len(files) == len(result.association.ccd_visits)
    rng = np.random.default_rng(0)
    for path in files:
        visit, detector = (int(p) for p in path.stem.split("_"))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # FITSFixedWarning included
            header = fits.getheader(path)
            full, tan = WCS(header), WCS(tan_part(header))
        assert header["CTYPE1"] == ("RA---TAN-SIP" if folder == "wcs" else "RA---TPV")
        assert not low_order_distortion_terms(header), path.name
        nx, ny = header["IMAGEW"], header["IMAGEH"]
        crval = result.solution.tangent_points(np.array([visit]))[0]
        assert (header["CRVAL1"], header["CRVAL2"]) == pytest.approx(tuple(crval), abs=1e-12)
        centre = ([(nx - 1) / 2], [(ny - 1) / 2])
        assert separation_mas(*tan.all_pix2world(*centre, 0), *full.all_pix2world(*centre, 0))[0] < 15e3
        x, y = rng.uniform(-0.5, nx - 0.5, 300), rng.uniform(-0.5, ny - 0.5, 300)
        exact = result.pixel_to_sky(np.full(300, visit), np.full(300, detector), x, y)
        err = separation_mas(*full.all_pix2world(x, y, 0), *exact)
        assert err.max() <= 1.5 * header["JCAL_MAX"] + 1e-6, (path.name, err.max(), header["JCAL_MAX"])
        assert header["JCAL_MAX"] < 1.0  # mas: the polynomial model is represented (nearly) exactly


def test_wcs_format_is_checked_and_reaches_the_facade():
    from jcal.task import JointcalConfig

    with pytest.raises(jcal.ConfigError, match="wcs_format"):
        jcal.FitConfig(wcs_format="tan")
    config = JointcalConfig()
    config.applyOverride("wcs_format", "tpv")
    assert config.toFitConfig().wcs_format == "tpv"


def test_simulated_input_wcs_files_open_without_warning(tmp_path):
    sim = jcal.simulate("tiny", seed=2, n_visits=2)
    jcal.write_simulation(sim, tmp_path / "sim")
    files = sorted((tmp_path / "sim" / "wcs").glob("*.fits"))
    assert files
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for path in files:
            WCS(fits.getheader(path))
    back = jcal.read_input(tmp_path / "sim")
    key = next(iter(sim.data.ccd_visits))
    assert (back.ccd_visits[key].nx, back.ccd_visits[key].ny) == (sim.data.ccd_visits[key].nx, sim.data.ccd_visits[key].ny)
