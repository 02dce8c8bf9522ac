"""Tests of jcal.io.lsst: LSST source tables, first-guess WCS, refcats, jointcal's numbers.

They read the real data shipped in ``tests/data`` (its README: provenance, licence) and skip
nothing. Tests that
decode an AST SkyWcs check the decoding when the optional ``starlink-pyast`` is installed, and
check the clear `InputError` naming it when it is not.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from astropy.io import fits

import jcal.io.lsst_wcs as lsst_wcs
from jcal.data import InputError
from jcal.io.lsst import (
    LsstPaths,
    LsstSourceSelection,
    ast_available,
    ast_pixel_to_sky,
    fit_tan_sip,
    htm_index,
    htm_trixel_vertices,
    htm_trixels_in_circle,
    jointcal_bounding_circle,
    read_lsst,
    read_lsst_refcat,
    read_lsst_sources,
    read_refcat_config,
    read_skywcs_file,
    read_visit_summary,
    tan_sip_from_ast,
    wcs_from_calexp_header,
    wcs_max_separation_mas,
)

DATA = Path(__file__).resolve().parent / "data"
CFHT = DATA / "cfht_minimal"
HSC = DATA / "hsc_sample"
HSC_TABLE = HSC / "sourceTable_visit_0034690_subset.parquet"
REFCAT = CFHT / "refcat" / "sdss-dr9-fink-v5b"
VISITS = (849375, 850587)
# README: the jointcal-like reference circle and its refcat count.
README_CIRCLE = (215.03935, 52.78374, 0.1403)


def test_data_present():
    assert (CFHT / "README.md").exists(), f"test data not found at {DATA}"
    assert HSC_TABLE.exists()


def _unit(ra, dec):
    ra, dec = np.radians(ra), np.radians(dec)
    return np.stack([np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)], axis=-1)


def _sep_arcsec(ra1, dec1, ra2, dec2):
    """Angular separation (chord form: exact down to micro-arcseconds)."""
    chord = np.linalg.norm(_unit(ra1, dec1) - _unit(ra2, dec2), axis=-1)
    return np.degrees(2 * np.arcsin(chord / 2)) * 3600


@pytest.fixture(scope="module")
def cfht():
    return read_lsst(CFHT, reference_error_mas=10.0)


@pytest.fixture(scope="module")
def cfht_calexp():
    return read_lsst(CFHT, reference_error_mas=10.0, wcs_source="calexp")


# --------------------------------------------------------------------------------------------
# Source tables and selection
# --------------------------------------------------------------------------------------------

def test_cfht_selection_counts_and_reasons(caplog):
    with caplog.at_level(logging.INFO, logger="jcal.io.lsst"):
        sources, counts = read_lsst_sources(CFHT / "sources")
    assert counts.kept(849375, 12) == 1 and counts.kept(850587, 12) == 2
    assert counts.per_ccd[(849375, 12)] == {"read": 2, "kept": 1, "snr": 1}  # the S/N 7.8 source
    assert counts.per_ccd[(850587, 12)] == {"read": 2, "kept": 2}
    assert counts.skipped_flags == {"hsmPsfMoments_flag"}
    assert "hsmPsfMoments_flag" in caplog.text and "skipped" in caplog.text
    assert len(sources) == 3
    # The README's fluxes (counts) of the kept sources.
    np.testing.assert_allclose(np.sort(sources.inst_flux), [20411.66, 21234.26, 40568.08], atol=0.01)
    assert sources.source_id[sources.visit == 849375][0] == 131329414033047692
    assert np.all(sources.x_err > 0)


def test_cfht_each_cut_is_applied(tmp_path):
    """Flip one column per row and check the cut and its name."""
    table = pq.read_table(CFHT / "sources" / "850587_12.parquet")
    cols = {n: table.column(n).to_pylist() for n in table.column_names}
    cols["pixelFlags_edge"][0] = True
    cols["parentSourceId"][1] = 42
    import pyarrow as pa
    pq.write_table(pa.table(cols), tmp_path / "850587_12.parquet")
    _, counts = read_lsst_sources(tmp_path / "850587_12.parquet")
    assert counts.per_ccd[(850587, 12)] == {"read": 2, "kept": 0, "flag:pixelFlags_edge": 1, "not_isolated": 1}
    # Without a selection both rows survive (they are valid measurements).
    _, counts = read_lsst_sources(tmp_path / "850587_12.parquet", selection=None)
    assert counts.kept(850587, 12) == 2


def test_unresolved_cut_needs_its_column():
    sel = LsstSourceSelection(unresolved=True, unresolved_columns=("sizeExtendedness",))
    with pytest.raises(InputError, match="sizeExtendedness"):
        read_lsst_sources(CFHT / "sources", selection=sel)
    # 'extendedness' (present) stands in by default. The second 849375 source is extended
    # (extendedness 1) and has S/N 7.8: the S/N cut comes first and claims it...
    _, counts = read_lsst_sources(CFHT / "sources", selection=LsstSourceSelection(unresolved=True))
    assert counts.per_ccd[(849375, 12)] == {"read": 2, "kept": 1, "snr": 1}
    # ... and without the S/N cut the unresolved cut does.
    _, counts = read_lsst_sources(CFHT / "sources", selection=LsstSourceSelection(unresolved=True, min_snr=None))
    assert counts.per_ccd[(849375, 12)] == {"read": 2, "kept": 1, "resolved": 1}
    assert counts.kept(850587, 12) == 2


def test_hsc_old_spelling_split_into_detectors():
    sources, counts = read_lsst_sources(HSC_TABLE, selection=LsstSourceSelection(min_snr=None, bad_flags=(),
                                                                                  add_flux_flag=False,
                                                                                  require_isolated=False))
    assert sorted(counts.per_ccd) == [(34690, 48), (34690, 56), (34690, 64)]
    for det in (48, 56, 64):
        assert counts.per_ccd[(34690, det)]["read"] == det  # the first d rows of detector d
    # 'decl' (old spelling of 'dec') was found for the finite-ra/dec cut, which removed nothing.
    assert counts.total("nonfinite_radec") == 0
    assert counts.total("read") == 168
    assert np.all(np.diff(sources.detector) >= 0)


def test_hsc_default_selection_uses_capitalised_flags():
    _, counts = read_lsst_sources(HSC_TABLE)
    # README: 24 rows have PixelFlags_edge set; it is the first cut, so all 24 count there.
    assert counts.total("flag:pixelFlags_edge") == 24
    assert counts.total("flag:hsmPsfMoments_flag") > 0  # HsmPsfMoments_flag matched case-insensitively
    assert counts.skipped_flags == set()
    assert counts.total("read") == counts.total("kept") + sum(counts.drops().values())


def test_hsc_nan_centroid_errors_counted():
    sources, counts = read_lsst_sources(HSC_TABLE, selection=None)
    assert counts.total("bad_centroid_err") == 59  # README: 59 rows with NaN xErr/yErr
    assert len(sources) == 168 - 59
    assert np.all(np.isfinite(sources.x_err))


def test_missing_column_names_it(tmp_path):
    table = pq.read_table(CFHT / "sources" / "849375_12.parquet")
    pq.write_table(table.drop(["xErr"]), tmp_path / "849375_12.parquet")
    with pytest.raises(InputError, match="'xErr'"):
        read_lsst_sources(tmp_path)
    pq.write_table(table.drop(["dec"]), tmp_path / "849375_12.parquet")
    with pytest.raises(InputError, match="'dec'.*'decl'"):
        read_lsst_sources(tmp_path)
    with pytest.raises(InputError, match="psfFlux_instFlux"):
        read_lsst_sources(CFHT / "sources", flux_type="psfFlux")


# --------------------------------------------------------------------------------------------
# First-guess WCS
# --------------------------------------------------------------------------------------------

def test_calexp_header_tan_sip_matches_visit_summary_corners():
    """The header WCS, evaluated with origin 0, reproduces the SkyWcs at the bbox corners."""
    for visit in VISITS:
        wcs, nx, ny = wcs_from_calexp_header(CFHT / "calexp_headers" / f"{visit}_12_image.hdr")
        assert (nx, ny) == (2048, 4612)
        assert wcs.sip is not None and wcs.wcs.ctype[0] == "RA---TAN-SIP"
        with fits.open(CFHT / "visitSummary" / f"{visit}.fits") as hdul:
            row = hdul[1].data[0]
            ra_c, dec_c = row["raCorners"], row["decCorners"]
        # visitSummary corners are the SkyWcs at the pixel-edge corners of the bbox.
        x = np.array([-0.5, 2047.5, 2047.5, -0.5])
        y = np.array([-0.5, -0.5, 4611.5, 4611.5])
        ra, dec = wcs.all_pix2world(x, y, 0)
        assert np.max(_sep_arcsec(ra, dec, ra_c, dec_c)) < 0.5e-3  # README: <= 0.16 mas
        ra1, dec1 = wcs.all_pix2world(x, y, 1)  # the 1-based mistake is ~1 px = ~265 mas off
        assert np.min(_sep_arcsec(ra1, dec1, ra_c, dec_c)) > 0.15


def test_calexp_header_origin_shift(tmp_path):
    header = fits.Header.fromtextfile(str(CFHT / "calexp_headers" / "849375_12_image.hdr"))
    base, _, _ = wcs_from_calexp_header(header)
    shifted = header.copy()
    shifted["CRVAL1A"], shifted["CRVAL2A"] = 100.0, 50.0  # a sub-image with XY0 = (100, 50)
    wcs, _, _ = wcs_from_calexp_header(shifted)
    x, y = np.array([0.0, 500.0, 1800.0]), np.array([0.0, 3000.0, 4000.0])
    ra0, dec0 = base.all_pix2world(x, y, 0)
    ra1, dec1 = wcs.all_pix2world(x + 100, y + 50, 0)  # parent pixels
    assert np.max(_sep_arcsec(ra0, dec0, ra1, dec1)) < 1e-9


def test_fit_tan_sip_reproduces_a_known_tan_sip():
    """The least-squares TAN-SIP fitter (used on AST) reproduces a header TAN-SIP exactly."""
    wcs, _, _ = wcs_from_calexp_header(CFHT / "calexp_headers" / "850587_12_image.hdr")

    def pix_to_sky(x, y):
        return wcs.all_pix2world(x, y, 0)

    fit = fit_tan_sip(pix_to_sky, (0, 0, 2047, 4611), order=4)
    assert wcs_max_separation_mas(fit, pix_to_sky, (0, 0, 2047, 4611)) < 1e-3
    ra, dec = fit.all_pix2world([10.0, 2000.0], [20.0, 4500.0], 0)
    x, y = fit.all_world2pix(ra, dec, 0)
    np.testing.assert_allclose([x, y], [[10.0, 2000.0], [20.0, 4500.0]], atol=1e-6)


def test_visit_summary_photocalib_and_visitinfo():
    expect = {849375: (0.54322421, 0.00013884, 300.202, 1.548, 2006.3819),
              850587: (0.52577558, 0.00019865, 300.181, 1.227, 2006.4172)}
    for visit, (mean, err, exptime, airmass, jyear) in expect.items():
        (row,) = read_visit_summary(CFHT / "visitSummary" / f"{visit}.fits")
        assert (row.visit, row.detector, row.band, row.physical_filter) == (visit, 12, "r", "r.MP9601")
        assert row.bbox == (0, 0, 2047, 4611) and (row.nx, row.ny) == (2048, 4612)
        assert row.photo_calib.is_constant
        np.testing.assert_allclose([row.photo_calib.mean, row.photo_calib.err], [mean, err], rtol=1e-4)
        vi = row.visit_info
        assert vi.exposure_id in (30577512, 30621144)
        np.testing.assert_allclose([vi.exptime, vi.airmass], [exptime, airmass])
        assert abs(2000.0 + (vi.mjd - 51544.5) / 365.25 - jyear) < 1e-4
        assert row.skywcs_ast.startswith("Begin FrameSet")


def test_visit_summary_skywcs_decoding():
    (row,) = read_visit_summary(CFHT / "visitSummary" / "849375.fits")
    header_wcs, _, _ = wcs_from_calexp_header(CFHT / "calexp_headers" / "849375_12_image.hdr")
    if not ast_available():
        with pytest.raises(InputError, match="starlink-pyast"):
            tan_sip_from_ast(row.skywcs_ast, row.bbox)
        return
    wcs, err = tan_sip_from_ast(row.skywcs_ast, row.bbox)
    assert err < 1.0  # mas; in practice ~1e-6 (the SkyWcs is itself a TAN-SIP)
    exact = ast_pixel_to_sky(row.skywcs_ast)
    assert wcs_max_separation_mas(header_wcs, exact, row.bbox) < 0.2  # README: 0.16 mas


def test_hsc_jointcal_wcs_files():
    files = sorted((HSC / "jointcal_wcs").glob("*.fits"))
    assert len(files) == 12
    bbox = (0, 0, 2047, 4175)  # HSC detectors
    for path in files:
        text = read_skywcs_file(path)
        assert text.startswith("Begin FrameSet") and 'Domain = "FOCAL"' in text
    if not ast_available():
        with pytest.raises(InputError, match="starlink-pyast"):
            tan_sip_from_ast(read_skywcs_file(files[0]), bbox)
        return
    centres = {}
    for path in files:
        wcs, err = tan_sip_from_ast(read_skywcs_file(path), bbox)
        assert err < 1.0  # mas: jointcal's output (order-5 visit polynomial) is close to a TAN-SIP
        scale = np.sqrt(abs(np.linalg.det(wcs.pixel_scale_matrix))) * 3600
        assert 0.15 < scale < 0.175  # HSC: ~0.168 arcsec/px at the centre, less at the edge
        visit, det = path.stem.split("_")
        centres.setdefault(visit, []).append(wcs.all_pix2world(1023.5, 2087.5, 0))
    assert sorted(centres) == ["0023900", "0023924", "0028976"]
    for cs in centres.values():
        cs = np.array(cs, dtype=float)
        # Tract 9615 is near (216.8, +0.7); the 4 detectors of a visit lie within HSC's 1.5 deg field.
        assert np.all(_sep_arcsec(cs[:, 0], cs[:, 1], 216.8, 0.7) < 2 * 3600)
        for c in cs:
            assert np.max(_sep_arcsec(cs[:, 0], cs[:, 1], c[0], c[1])) < 1.6 * 3600


def test_without_ast_falls_back_to_calexp_or_names_package(monkeypatch):
    monkeypatch.setattr(lsst_wcs, "_import_ast", lambda: None)
    assert not ast_available()
    result = read_lsst(CFHT, reference_error_mas=10.0)
    assert set(result.wcs_origin.values()) == {"calexp"}
    paths = LsstPaths.from_folder(CFHT)
    no_headers = LsstPaths(sources=paths.sources, visit_summaries=paths.visit_summaries, refcat=paths.refcat)
    with pytest.raises(InputError, match="starlink-pyast"):
        read_lsst(no_headers, reference_error_mas=10.0)
    with pytest.raises(InputError, match="starlink-pyast"):
        read_lsst(CFHT, reference_error_mas=10.0, wcs_source="visitSummary")
    with pytest.raises(InputError, match="no calexp header"):
        read_lsst(no_headers, reference_error_mas=10.0, wcs_source="calexp")


# --------------------------------------------------------------------------------------------
# HTM and reference catalogs
# --------------------------------------------------------------------------------------------

def test_htm_index_known_shard_and_roots():
    assert int(htm_index(215.0, 52.8, 7)) == 225822  # inside the cfht_minimal shard
    with fits.open(REFCAT / "225822.fits") as hdul:
        d = hdul[1].data
        ids = htm_index(np.degrees(d["coord_ra"]), np.degrees(d["coord_dec"]), 7)
    assert np.all(ids == 225822)  # every row of the shard
    # Root trixels: N3 = +x+y+z octant (15), S0 = +x+y-z (8); children of S0 are 32..35.
    assert int(htm_index(45.0, 45.0, 0)) == 15 and int(htm_index(45.0, -45.0, 0)) == 8
    assert 32 <= int(htm_index(45.0, -45.0, 1)) <= 35
    verts = htm_trixel_vertices([225822])[0]
    ra = np.degrees(np.arctan2(verts[:, 1], verts[:, 0])) % 360
    dec = np.degrees(np.arcsin(verts[:, 2]))
    # README: the shard spans RA 213.94-215.44, Dec 52.42-53.37 (its stars; the trixel a bit more).
    assert ra.min() < 213.95 and ra.max() > 215.43 and dec.min() < 52.43 and dec.max() > 53.36
    near = htm_trixels_in_circle(215.04, 52.78, 0.14, 7)
    assert 225822 in near and len(near) < 10


def test_refcat_config_is_parsed_not_executed(tmp_path):
    cfg = read_refcat_config(REFCAT / "config.py")
    assert cfg["format_version"] == 1 and cfg["ref_dataset_name"] == "sdss"
    assert cfg["indexer['HTM'].depth"] == 7
    marker = tmp_path / "executed"
    evil = tmp_path / "config.py"
    evil.write_text(f"import os\nopen({str(marker)!r}, 'w').close()\nconfig.format_version=1\n"
                    f"config.ref_dataset_name=__import__('os').getcwd()\n")
    cfg = read_refcat_config(evil)
    assert not marker.exists() and cfg == {"format_version": 1}


def test_refcat_read_whole_shard():
    ref = read_lsst_refcat(REFCAT, 214.7, 52.9, 2.0, reference_error_mas=10.0)
    cat = ref.catalog
    assert len(cat) == 2628 and ref.shards == (225822,) and ref.name == "sdss"
    assert 213.94 < cat.ra.min() < 213.95 and 215.43 < cat.ra.max() < 215.44  # degrees, not radians
    assert 52.41 < cat.dec.min() and cat.dec.max() < 53.38
    assert sorted(cat.fluxes) == ["g", "i", "r", "u", "z"]
    u, _ = cat.fluxes["u"]
    assert np.isnan(u).sum() == 374 and np.isnan(cat.fluxes["g"][0]).sum() == 3
    r, r_err = cat.fluxes["r"]
    assert np.all(np.isfinite(r)) and np.nanmedian(r) > 1e3  # nJy
    assert np.all(cat.ra_err == 10.0) and np.all(cat.epoch == 2000.0) and not cat.has_proper_motion.any()
    assert ref.resolved.sum() == 1452 and ref.flags["photometric"].all()
    # The README's two matched stars: r_flux 9787 +- 631 and 21853 +- 687 nJy.
    for flux, err in ((9787, 631), (21853, 687)):
        assert np.any((np.abs(r - flux) < 1) & (np.abs(r_err - err) < 1))


def test_refcat_missing_errors_raise():
    with pytest.raises(InputError, match="reference_error_mas"):
        read_lsst_refcat(REFCAT, 215.04, 52.78, 0.14)
    with pytest.raises(InputError, match="reference_error_mas"):
        read_lsst(CFHT)


def test_refcat_not_covering_field_raises(tmp_path):
    other = tmp_path / "elsewhere"
    other.mkdir()
    shutil.copy(REFCAT / "config.py", other / "config.py")
    shutil.copy(REFCAT / "225822.fits", other / "131072.fits")  # a depth-7 trixel near RA 0, Dec 0
    with pytest.raises(InputError, match="does not cover the field"):
        read_lsst_refcat(other, 215.04, 52.78, 0.14, reference_error_mas=10.0)
    # Right shard, but a circle with no star in it.
    with pytest.raises(InputError, match="does not cover the field"):
        read_lsst_refcat(REFCAT, 213.0, 52.0, 0.01, reference_error_mas=10.0)
    paths = LsstPaths.from_folder(CFHT)
    moved = LsstPaths(sources=paths.sources, visit_summaries=paths.visit_summaries, refcat=other,
                      calexp_headers=paths.calexp_headers)
    with pytest.raises(InputError, match="does not cover the field"):
        read_lsst(moved, reference_error_mas=10.0)


# --------------------------------------------------------------------------------------------
# read_lsst and jointcal's bounding circle
# --------------------------------------------------------------------------------------------

def _check_circle(circle):
    ra, dec, radius = circle
    # jointcal's (sphgeom's) polygon centroid sits 0.47" south of the README's vertex-mean
    # centre (the README tool's approximation); radius and star count agree.
    assert _sep_arcsec(ra, dec, README_CIRCLE[0], README_CIRCLE[1]) < 1.0
    assert abs(radius - README_CIRCLE[2]) < 1e-4


def test_read_lsst_cfht(cfht):
    data = cfht.data
    assert len(data.sources) == 3 and sorted(data.ccd_visits) == [(849375, 12), (850587, 12)]
    assert list(data.visits.visit) == list(VISITS) and list(data.visits.band) == ["r", "r"]
    np.testing.assert_allclose(data.visits.epoch, [2006.3819, 2006.4172], atol=1e-4)
    np.testing.assert_allclose(data.visits.exptime, [300.202, 300.181])
    for ccd in data.ccd_visits.values():
        assert (ccd.nx, ccd.ny) == (2048, 4612)
    np.testing.assert_allclose(cfht.photo_calib[(849375, 12)].mean, 0.54322421, rtol=1e-7)
    np.testing.assert_allclose(cfht.photo_calib[(850587, 12)].mean, 0.52577558, rtol=1e-7)
    assert cfht.counts.kept(849375, 12) == 1
    expected_origin = "visitSummary" if ast_available() else "calexp"
    assert set(cfht.wcs_origin.values()) == {expected_origin}
    assert data.camera is not None and list(data.camera.detector) == [12]
    np.testing.assert_allclose([data.camera.focal_x[0], data.camera.focal_y[0]], [-28.6605, 31.52925])
    assert abs(data.camera.pixel_scale[0] - 0.187) < 0.005  # arcsec/px, from the WCS


def test_bounding_circle_and_346_refstars(cfht, cfht_calexp):
    for result in (cfht, cfht_calexp):
        _check_circle(result.bounding_circle)
        assert len(result.data.refcat) == 346  # jointcal's photometry_collected_refStars
        assert len(result.refcat.resolved) == 346  # galaxies kept, as jointcal does
        assert jointcal_bounding_circle(result) == pytest.approx(result.bounding_circle)
    # The header and AST first guesses give the same circle to far below a mas.
    assert _sep_arcsec(*cfht.bounding_circle[:2], *cfht_calexp.bounding_circle[:2]) < 1e-3
    # Without boresights the detector centres stand in for them: a close, not exact, circle.
    approx = jointcal_bounding_circle(cfht.data)
    assert _sep_arcsec(*approx[:2], *cfht.bounding_circle[:2]) < 2.0


def test_read_lsst_measured_stars_match_refcat(cfht):
    """Projected with the first-guess WCS, the kept sources land within 0.5" of refcat stars."""
    data = cfht.data
    ref = data.refcat
    for i in range(len(data.sources)):
        ccd = data.ccd_visits[(int(data.sources.visit[i]), int(data.sources.detector[i]))]
        ra, dec = ccd.wcs.all_pix2world(data.sources.x[i], data.sources.y[i], 0)
        assert np.min(_sep_arcsec(ra, dec, ref.ra, ref.dec)) < 0.5  # README: ~250 mas offset
