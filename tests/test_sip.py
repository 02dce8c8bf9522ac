"""Tests of jcal.io.sip: TAN-SIP approximations of known pixel -> sky mappings."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from jcal.io.sip import fit_tan_sip, tan_part, write_wcs_fits

NX, NY = 2000, 1000
SCALE_DEG = 0.2 / 3600.0
MAS_PER_RAD = 180.0 / np.pi * 3600.0e3


def rotated_cd(angle_deg: float = 30.0) -> np.ndarray:
    c, s = np.cos(np.radians(angle_deg)), np.sin(np.radians(angle_deg))
    return SCALE_DEG * np.array([[-c, s], [s, c]])


def tan_wcs(crpix=(300.0, 700.0), crval=(210.0, 54.0)) -> WCS:
    """A TAN WCS whose CRPIX is not the detector centre (so fit_tan_sip must re-centre)."""
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crpix = list(crpix)
    w.wcs.crval = list(crval)
    w.wcs.cd = rotated_cd()
    return w


def separation_mas(ra1, dec1, ra2, dec2) -> np.ndarray:
    def vec(ra, dec):
        ra, dec = np.radians(ra), np.radians(dec)
        return np.stack([np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)], axis=-1)

    a, b = vec(ra1, dec1), vec(ra2, dec2)
    return np.arctan2(np.linalg.norm(np.cross(a, b), axis=-1), np.sum(a * b, axis=-1)) * MAS_PER_RAD


def check_grid(grid: int = 50):
    """The (2 grid - 1)^2 grid on which fit_tan_sip measures its errors."""
    gx, gy = np.meshgrid(np.linspace(-0.5, NX - 0.5, 2 * grid - 1), np.linspace(-0.5, NY - 0.5, 2 * grid - 1))
    return gx.ravel(), gy.ravel()


def errors_of(header: fits.Header, pixel_to_sky, x, y) -> np.ndarray:
    ra, dec = WCS(header).all_pix2world(x, y, 0)
    return separation_mas(ra, dec, *pixel_to_sky(x, y))


def inverse_error_px(header: fits.Header, x, y) -> np.ndarray:
    """Pixel round trip through the linear WCS + inverse SIP (AP/BP), no iteration.

    The SIP inverse is evaluated from its definition, u = U + AP(U, V) with (U, V) the
    linear-WCS pixel offsets from CRPIX, straight from the header cards.
    """
    w = WCS(header)
    sky = w.all_pix2world(np.stack([x, y], axis=1), 0)
    crpix0 = np.array([header["CRPIX1"], header["CRPIX2"]]) - 1.0
    uv = w.wcs_world2pix(sky, 0) - crpix0
    out = uv.copy()
    for axis, name in enumerate(("AP", "BP")):
        n = header[f"{name}_ORDER"]
        for p in range(n + 1):
            for q in range(n + 1 - p):
                out[:, axis] += header.get(f"{name}_{p}_{q}", 0.0) * uv[:, 0] ** p * uv[:, 1] ** q
    pix = out + crpix0
    return np.hypot(pix[:, 0] - x, pix[:, 1] - y)


def random_pixels(n=2000, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(-0.5, NX - 0.5, n), rng.uniform(-0.5, NY - 0.5, n)


def test_exact_tan_round_trips():
    w = tan_wcs()

    def pixel_to_sky(x, y):
        return w.all_pix2world(x, y, 0)

    header, rms = fit_tan_sip(pixel_to_sky, NX, NY)
    assert rms < 1e-6
    assert header["A_ORDER"] == 2 and header["AP_ORDER"] == 4
    assert header["NAXIS1"] == NX and header["NAXIS2"] == NY
    assert header["CRPIX1"] == pytest.approx((NX - 1) / 2 + 1) and header["CRPIX2"] == pytest.approx((NY - 1) / 2 + 1)
    np.testing.assert_allclose([header["CRVAL1"], header["CRVAL2"]],
                               np.ravel(w.all_pix2world([(NX - 1) / 2], [(NY - 1) / 2], 0)), rtol=0, atol=1e-12)
    cd = np.array([[header["CD1_1"], header["CD1_2"]], [header["CD2_1"], header["CD2_2"]]])
    # Same plate scale (the tangent point moved 0.1 deg, which rotates CD slightly).
    assert np.sqrt(abs(np.linalg.det(cd))) == pytest.approx(SCALE_DEG, rel=1e-5)
    x, y = random_pixels()
    assert errors_of(header, pixel_to_sky, x, y).max() < 1e-6
    assert inverse_error_px(header, x, y).max() < 1e-6


def sip_wcs() -> WCS:
    """A TAN-SIP WCS with an order-3 distortion of several pixels at the corners."""
    h = tan_wcs().to_header()
    h["CTYPE1"], h["CTYPE2"] = "RA---TAN-SIP", "DEC--TAN-SIP"
    for name in ("A", "B"):
        h[f"{name}_ORDER"] = 3
    h["A_2_0"], h["A_1_1"], h["A_0_2"] = 2e-6, -1e-6, 3e-6
    h["A_3_0"], h["A_1_2"] = 1e-9, -2e-9
    h["B_2_0"], h["B_1_1"], h["B_0_2"] = -1e-6, 2e-6, 1e-6
    h["B_0_3"], h["B_2_1"] = 1.5e-9, 1e-9
    return WCS(h)


def test_order3_sip_is_reproduced():
    w = sip_wcs()

    def pixel_to_sky(x, y):
        return w.all_pix2world(x, y, 0)

    header, rms = fit_tan_sip(pixel_to_sky, NX, NY)  # auto order stops at 3
    assert header["A_ORDER"] == 3 and rms < 0.01
    x, y = random_pixels(seed=1)
    assert errors_of(header, pixel_to_sky, x, y).max() < 0.01
    assert inverse_error_px(header, x, y).max() < 1e-3
    # A fixed, too-low order is honoured and its (larger) error reported truthfully.
    header2, rms2 = fit_tan_sip(pixel_to_sky, NX, NY, order=2)
    assert header2["A_ORDER"] == 2 and rms2 > 1.0
    assert header2["JCAL_RMS"] == rms2


def test_smooth_non_polynomial_distortion_auto_order():
    w = tan_wcs()
    amp = 0.5  # pixels

    def pixel_to_sky(x, y):
        xd = x + amp * np.sin(2 * np.pi * y / NY) + 0.3 * amp * np.cos(np.pi * x / NX)
        yd = y + amp * np.sin(2 * np.pi * x / NX)
        return w.all_pix2world(xd, yd, 0)

    header, rms = fit_tan_sip(pixel_to_sky, NX, NY, target_mas=0.1, grid=30)  # small grid: fast test
    assert rms < 0.1
    assert 3 <= header["A_ORDER"] <= 9
    # The recorded errors are the measured ones on the check grid ...
    xc, yc = check_grid(30)
    err = errors_of(header, pixel_to_sky, xc, yc)
    assert header["JCAL_RMS"] == rms == pytest.approx(np.sqrt(np.mean(err**2)), rel=1e-5)
    assert header["JCAL_MAX"] == pytest.approx(err.max(), rel=1e-5)
    assert header.comments["JCAL_RMS"] and header.comments["JCAL_MAX"]
    # ... and hold elsewhere on the detector too.
    x, y = random_pixels(seed=2)
    assert np.sqrt(np.mean(errors_of(header, pixel_to_sky, x, y) ** 2)) < 0.1
    assert inverse_error_px(header, x, y).max() < 1e-3
    assert header["JCAL_IMX"] < 1e-3


def low_order_distortion_terms(header: fits.Header) -> list[str]:
    """SIP/TPV cards of order 0 or 1 other than TPV's identity (PV1_1 = PV2_1 = 1)."""
    low = [f"{n}_{p}_{q}" for n in ("A", "B", "AP", "BP") for p, q in ((0, 0), (1, 0), (0, 1))]
    low += ["PV1_0", "PV1_2", "PV2_0", "PV2_2"]
    bad = [k for k in low if k in header and header[k] != 0.0]
    return bad + [k for k in ("PV1_1", "PV2_1") if k in header and header[k] != 1.0]


@pytest.mark.parametrize("kind", ["sip", "tpv"])
def test_given_crval_off_centre(kind):
    """The visit's tangent point 0.5 deg off the detector: CRPIX moves to its pixel (off the
    detector), the distortion has no term of order 0 or 1, astropy evaluates the header within
    the recorded JCAL_MAX, and the TAN part alone lands within the distortion's size."""
    w = sip_wcs()

    def pixel_to_sky(x, y):
        return w.all_pix2world(x, y, 0)

    crval = tuple(float(c) for c in w.all_pix2world([[-400.0, 300.0]], 0)[0])  # off the detector
    header, rms = fit_tan_sip(pixel_to_sky, NX, NY, crval=crval, order=3, kind=kind)
    assert (header["CRVAL1"], header["CRVAL2"]) == pytest.approx(crval, rel=1e-15)
    assert header["CTYPE1"] == ("RA---TAN-SIP" if kind == "sip" else "RA---TPV")
    assert not low_order_distortion_terms(header)
    crpix = np.array([header["CRPIX1"], header["CRPIX2"]]) - 1.0
    assert not (0 <= crpix[0] < NX and 0 <= crpix[1] < NY)  # off the detector
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        full, tan = WCS(header), WCS(tan_part(header))
        np.testing.assert_allclose(full.all_pix2world([crpix], 0)[0], crval, rtol=0, atol=1e-10)
        x, y = random_pixels(seed=3)
        err = separation_mas(*full.all_pix2world(x, y, 0), *pixel_to_sky(x, y))
        assert rms < 0.01 and err.max() <= header["JCAL_MAX"] * 1.5 + 1e-6
        centre = ([(NX - 1) / 2], [(NY - 1) / 2])
        offset = separation_mas(*tan.all_pix2world(*centre, 0), *full.all_pix2world(*centre, 0))[0]
        assert 10.0 < offset < 15e3  # mas: the distortion at the centre, far below a constant term's
    if kind == "sip":
        assert inverse_error_px(header, x, y).max() < 1e-3


@pytest.mark.filterwarnings("error")  # a header-only file opens without FITSFixedWarning
def test_write_wcs_fits_round_trip(tmp_path):
    w = sip_wcs()
    header, _ = fit_tan_sip(lambda x, y: w.all_pix2world(x, y, 0), NX, NY, order=3)
    path = tmp_path / "sub" / "wcs.fits"
    write_wcs_fits(header, path)
    with fits.open(path) as hdul:
        read = hdul[0].header
        assert hdul[0].data is None or hdul[0].data.size == 0
    assert (read["IMAGEW"], read["IMAGEH"]) == (NX, NY)
    assert read["JCAL_RMS"] == header["JCAL_RMS"]
    x, y = random_pixels(200, seed=4)
    a = np.array(WCS(read).all_pix2world(x, y, 0))
    b = np.array(WCS(header).all_pix2world(x, y, 0))
    np.testing.assert_array_equal(a, b)
    assert list(tmp_path.joinpath("sub").iterdir()) == [path]  # no temp file left behind


@pytest.mark.parametrize("crval", [(0.01, -10.0), (123.0, 89.99)])
def test_ra_wrap_and_pole(crval):
    w = tan_wcs(crpix=(NX / 2, NY / 2), crval=crval)  # the detector straddles RA = 0 / contains the pole
    header, rms = fit_tan_sip(lambda x, y: w.all_pix2world(x, y, 0), NX, NY, order=2)
    assert rms < 1e-5
    assert 0.0 <= header["CRVAL1"] < 360.0


@pytest.mark.filterwarnings("error")
def test_many_detectors_at_once_match_one_at_a_time(tmp_path):
    """The batched fit (one call for every detector-visit of a size) gives each item the WCS a
    single fit gives it, and the written files read back in astropy with the recorded errors."""
    from jcal.io.sip import fit_tan_sip_many

    wcss = [tan_wcs(crval=(210.0 + 0.3 * k, 54.0 - 0.2 * k)) for k in range(3)] + [sip_wcs()]

    def sky_of_items(item, x, y):
        ra, dec = np.empty(x.size), np.empty(x.size)
        for k, w in enumerate(wcss):
            on = item == k
            ra[on], dec[on] = w.all_pix2world(x[on], y[on], 0)
        return ra, dec

    cards, rms = fit_tan_sip_many(sky_of_items, len(wcss), NX, NY, order=3, grid=20)
    xc, yc = check_grid(20)
    for k, w in enumerate(wcss):
        single, single_rms = fit_tan_sip(lambda x, y: w.all_pix2world(x, y, 0), NX, NY, order=3, grid=20)
        header = fits.Header(cards[k])
        assert header["JCAL_RMS"] == rms[k] == pytest.approx(single_rms, rel=1e-6, abs=1e-9)
        for key in ("CRVAL1", "CRVAL2", "CD1_1", "CD2_1", "A_2_0", "B_1_1", "AP_0_3"):
            assert header[key] == pytest.approx(single[key], rel=1e-9, abs=1e-18)
        path = tmp_path / f"{k}.fits"
        write_wcs_fits(cards[k], path)
        read = fits.getheader(path)
        err = separation_mas(*WCS(read).all_pix2world(xc, yc, 0), *w.all_pix2world(xc, yc, 0))
        assert read["JCAL_RMS"] == pytest.approx(np.sqrt(np.mean(err**2)), rel=1e-4, abs=1e-7)
        assert read["JCAL_MAX"] == pytest.approx(err.max(), rel=1e-4, abs=1e-7)


@pytest.mark.parametrize("value", [1.0, -0.0, 3.0e-12, -1.2345678901234567e-05, 123456789.123456789, 1e300,
                                   -2.5e-300, 0.1 + 0.2])
def test_fits_reals_read_back_within_written_precision(value):
    from jcal.io.fits_cards import _card

    card = _card("X", value, "comment")
    assert len(card) == 80
    read = fits.Card.fromstring(card).value
    assert read == pytest.approx(value, rel=1e-13, abs=0.0)
