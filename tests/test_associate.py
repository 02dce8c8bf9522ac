"""Tests of jcal.associate on tiny hand-built inputs (plain TAN WCSs, a few stars)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from astropy.wcs import WCS

from jcal.associate import Association, associate
from jcal.config import FitConfig
from jcal.data import CcdVisit, InputData, InputError, ReferenceCatalog, SourceCatalog, VisitTable

RA0, DEC0 = 150.0, 2.0
SCALE = 0.2  # arcsec / pixel
NX = NY = 1000
ARCSEC = 1.0 / 3600.0


def tan_wcs(ra0: float = RA0, dec0: float = DEC0) -> WCS:
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [ra0, dec0]
    w.wcs.crpix = [NX / 2 + 0.5, NY / 2 + 0.5]
    w.wcs.cdelt = [-SCALE * ARCSEC, SCALE * ARCSEC]
    return w


def offset(ra, dec, east_arcsec=0.0, north_arcsec=0.0):
    """Small on-sky offset (arcsec) of positions in degrees."""
    ra, dec = np.asarray(ra, float), np.asarray(dec, float)
    return ra + east_arcsec * ARCSEC / np.cos(np.radians(dec)), dec + north_arcsec * ARCSEC


def mjd_of(year: float) -> float:
    return 51544.5 + (year - 2000.0) * 365.25


def make_data(per_visit: dict[int, tuple[np.ndarray, np.ndarray]], ref_ra, ref_dec, *, year=2020.0,
              ref_epoch=2020.0, pmra=None, pmdec=None, snr=100.0, wcs_shift_arcsec=0.0) -> InputData:
    """Sources of each visit (one detector, 0) at given sky positions, through a TAN WCS.

    wcs_shift_arcsec: the first-guess WCS points this far north of the truth.
    """
    wcs = tan_wcs()
    cols = {k: [] for k in ("visit", "detector", "x", "y")}
    ccd_visits = {}
    for visit, (ra, dec) in per_visit.items():
        x, y = wcs.all_world2pix(*offset(ra, dec, north_arcsec=-wcs_shift_arcsec), 0)
        cols["visit"].append(np.full(len(x), visit))
        cols["detector"].append(np.zeros(len(x), int))
        cols["x"].append(x)
        cols["y"].append(y)
        ccd_visits[(visit, 0)] = CcdVisit(visit=visit, detector=0, wcs=wcs, nx=NX, ny=NY)
    cols = {k: np.concatenate(v) for k, v in cols.items()}
    n = len(cols["x"])
    sources = SourceCatalog(**cols, x_err=np.full(n, 0.02), y_err=np.full(n, 0.02),
                            inst_flux=np.full(n, snr * 10.0), inst_flux_err=np.full(n, 10.0))
    r = len(ref_ra)
    refcat = ReferenceCatalog(ref_id=np.arange(r) + 1000, ra=ref_ra, dec=ref_dec, ra_err=np.full(r, 1.0),
                              dec_err=np.full(r, 2.0), epoch=np.full(r, ref_epoch), pmra=pmra, pmdec=pmdec,
                              pmra_err=None if pmra is None else np.full(r, 0.1),
                              pmdec_err=None if pmdec is None else np.full(r, 0.1))
    visit_ids = sorted(per_visit)
    years = [year[v] if isinstance(year, dict) else year for v in visit_ids]
    visits = VisitTable(visit=visit_ids, mjd=[mjd_of(y) for y in years], band=["r"] * len(visit_ids))
    return InputData(sources=sources, ccd_visits=ccd_visits, refcat=refcat, visits=visits)


def three_stars():
    ra, dec = offset(np.full(3, RA0), np.full(3, DEC0), np.array([-30.0, 0.0, 25.0]), np.array([10.0, -20.0, 5.0]))
    return ra, dec


def star_sets(assoc: Association, data: InputData) -> set[frozenset]:
    """Order-free description: each star as the set of its detections' source ids."""
    sid = data.sources.source_id[assoc.source_index]
    return {frozenset(sid[assoc.star == s].tolist()) for s in range(assoc.n_stars)}


def test_two_visits_three_stars():
    ra, dec = three_stars()
    data = make_data({1: (ra, dec), 2: offset(ra, dec, 0.1, 0.0)}, ra, dec)
    a = associate(data, FitConfig())
    assert a.n_stars == 3 and a.n_measurements == 6
    np.testing.assert_array_equal(a.visits, [1, 2])
    np.testing.assert_array_equal(a.detectors, [0])
    np.testing.assert_array_equal(a.ccd_visits, [[1, 0], [2, 0]])
    # Sorted by (star, visit); one detection per visit per star.
    np.testing.assert_array_equal(a.star, [0, 0, 1, 1, 2, 2])
    np.testing.assert_array_equal(a.visit_index, [0, 1] * 3)
    # Each star is the same source row index in both visits (rows i and i + 3).
    assert star_sets(a, data) == {frozenset({i, i + 3}) for i in range(3)}
    # Reference matches: the star with source 0 matches reference row 0, etc.
    for s in range(3):
        row = a.source_index[a.star == s][0]
        assert a.star_ref[s] == row
    sep = np.hypot((a.star_ra - ra[a.star_ref]) * np.cos(np.radians(DEC0)), a.star_dec - dec[a.star_ref])
    assert np.all(sep / ARCSEC < 0.06)  # mean of 0 and 0.1 arcsec offsets
    np.testing.assert_allclose(a.star_epoch, 2020.0)
    np.testing.assert_allclose(a.star_ref_ra_err, 1.0)
    np.testing.assert_allclose(a.star_ref_dec_err, 2.0)
    assert a.counts["sources_total"] == 6 and a.counts["stars_kept"] == 3
    assert a.counts["reference_stars_collected"] == 3 and a.counts["reference_stars_matched"] == 3
    assert a.counts["measurements"] == 6 and a.counts["ccd_visits"] == 2
    # Config override of the reference errors.
    b = associate(data, FitConfig(reference_error_mas=5.0))
    np.testing.assert_allclose(b.star_ref_ra_err, 5.0)
    np.testing.assert_allclose(b.star_ref_dec_err, 5.0)


def test_snr_selection_drops_faint_sources():
    ra, dec = three_stars()
    data = make_data({1: (ra, dec), 2: (ra, dec)}, ra, dec)
    flux = data.sources.inst_flux.copy()
    flux[[0, 3]] = 50.0  # star 0 at S/N 5 in both visits
    src = SourceCatalog(**{**{f: getattr(data.sources, f) for f in
                              ("visit", "detector", "x", "y", "x_err", "y_err", "inst_flux_err", "source_id")},
                           "inst_flux": flux})
    data = InputData(sources=src, ccd_visits=data.ccd_visits, refcat=data.refcat, visits=data.visits)
    a = associate(data, FitConfig(min_snr=10.0))
    assert a.counts["sources_selected"] == 4 and a.n_stars == 2
    assert 0 not in a.source_index and 3 not in a.source_index


def test_double_detection_in_one_visit_is_split():
    ra, dec = three_stars()
    # Visit 1 sees star 0 twice (0.5" apart); visit 2 sees it once, 0.1" from the first.
    ra1, dec1 = np.r_[ra, offset(ra[0], dec[0], 0.5, 0.0)[0]], np.r_[dec, dec[0]]
    data = make_data({1: (ra1, dec1), 2: offset(ra, dec, 0.1, 0.0)}, ra, dec)
    a = associate(data, FitConfig(min_measurements=2))
    assert a.counts["groups_split"] == 1
    assert star_sets(a, data) == {frozenset({0, 4}), frozenset({1, 5}), frozenset({2, 6})}
    # With min_measurements=1 the spurious detection becomes its own, unmatched star.
    b = associate(data, FitConfig(min_measurements=1))
    assert star_sets(b, data) == {frozenset({0, 4}), frozenset({1, 5}), frozenset({2, 6}), frozenset({3})}
    assert b.star_ref[b.star[b.source_index == 3][0]] == -1
    for s in range(b.n_stars):
        v = b.visit_index[b.star == s]
        assert len(v) == len(set(v.tolist()))


def test_close_pair_chained_by_friends_of_friends_is_separated():
    # Two stars 0.8" apart, each seen in 3 visits with 0.05" jitter: friends-of-friends at
    # 1" chains them into one group, which the radius-halving split must separate cleanly.
    ra, dec = offset(np.array([RA0, RA0]), np.array([DEC0, DEC0]), np.array([0.0, 0.8]), 0.0)
    rng = np.random.default_rng(1)
    per_visit = {v: offset(ra, dec, rng.normal(0, 0.05, 2), rng.normal(0, 0.05, 2)) for v in (1, 2, 3)}
    data = make_data(per_visit, ra, dec)
    a = associate(data, FitConfig())
    assert star_sets(a, data) == {frozenset({0, 2, 4}), frozenset({1, 3, 5})}
    assert sorted(a.star_ref.tolist()) == [0, 1]


def test_shuffled_input_gives_the_same_association():
    rng = np.random.default_rng(7)
    n = 60
    ra, dec = offset(np.full(n, RA0), np.full(n, DEC0), rng.uniform(-90, 90, n), rng.uniform(-90, 90, n))
    # A few close pairs and near-duplicates to exercise the splitting rules.
    ra[1], dec[1] = offset(ra[0], dec[0], 0.7, 0.2)
    ra[3], dec[3] = offset(ra[2], dec[2], 0.0, 0.9)
    per_visit = {}
    for v in range(1, 5):
        seen = rng.random(n) < 0.8
        r, d = offset(ra[seen], dec[seen], rng.normal(0, 0.1, seen.sum()), rng.normal(0, 0.1, seen.sum()))
        if v == 2:  # a doubly-detected star
            r, d = np.r_[r, offset(r[0], d[0], 0.02, 0.0)[0]], np.r_[d, d[0]]
        per_visit[v] = (r, d)
    data = make_data(per_visit, ra, dec)
    a = associate(data, FitConfig())
    perm = rng.permutation(len(data.sources))
    shuffled = InputData(sources=data.sources.take(perm), ccd_visits=data.ccd_visits, refcat=data.refcat,
                         visits=data.visits)
    b = associate(shuffled, FitConfig())
    assert star_sets(a, data) == star_sets(b, shuffled)
    # Same reference match for the same star, and identical star numbering (canonical).
    sid_a = data.sources.source_id[a.source_index]
    sid_b = shuffled.sources.source_id[b.source_index]
    np.testing.assert_array_equal(sid_a, sid_b)
    np.testing.assert_array_equal(a.star, b.star)
    np.testing.assert_array_equal(a.star_ref, b.star_ref)
    np.testing.assert_array_equal(a.star_ra, b.star_ra)
    assert a.counts == b.counts
    for s in range(a.n_stars):
        v = a.visit_index[a.star == s]
        assert len(v) == len(set(v.tolist()))


def test_proper_motion_carries_reference_to_the_visit_epoch():
    ra, dec = three_stars()
    # Reference epoch 2016, visits in 2024: star 1 moved 2" east (250 mas/yr) since then.
    ref_ra, ref_dec = ra.copy(), dec.copy()
    ref_ra[1], ref_dec[1] = offset(ra[1], dec[1], -2.0, 0.0)
    pmra, pmdec = np.array([0.0, 250.0, np.nan]), np.array([0.0, 0.0, np.nan])
    data = make_data({1: (ra, dec), 2: (ra, dec)}, ref_ra, ref_dec, year=2024.0, ref_epoch=2016.0,
                     pmra=pmra, pmdec=pmdec)
    a = associate(data, FitConfig())
    assert a.counts["reference_stars_matched"] == 3
    for s in range(3):  # stars are numbered canonically: compare through the source rows
        assert a.star_ref[s] == a.source_index[a.star == s][0]
    s = a.star_ref == 1
    sep = np.hypot((a.star_ref_ra[s] - ra[1]) * np.cos(np.radians(DEC0)), a.star_ref_dec[s] - dec[1]) / ARCSEC
    assert sep[0] < 1e-3
    # Without the proper motion, that star is 2" away and stays unmatched.
    data_nopm = make_data({1: (ra, dec), 2: (ra, dec)}, ref_ra, ref_dec, year=2024.0, ref_epoch=2016.0)
    b = associate(data_nopm, FitConfig())
    assert b.counts["reference_stars_matched"] == 2
    assert b.star_ref.tolist().count(-1) == 1


def test_fast_mover_over_a_long_baseline():
    # 500 mas/yr east; reference epoch 2016, visits in 2020 and 2028 (mean epoch 2024).
    ra, dec = three_stars()
    pmra, pmdec = np.array([500.0, 0.0, 0.0]), np.zeros(3)
    per_visit = {}
    for visit, year in ((1, 2020.0), (2, 2028.0)):
        r, d = ra.copy(), dec.copy()
        r[0], d[0] = offset(ra[0], dec[0], 0.5 * (year - 2016.0), 0.0)
        per_visit[visit] = (r, d)
    data = make_data(per_visit, ra, dec, year={1: 2020.0, 2: 2028.0}, ref_epoch=2016.0, pmra=pmra, pmdec=pmdec)
    a = associate(data, FitConfig(match_radius_arcsec=5.0))
    assert a.n_stars == 3 and a.counts["reference_stars_matched"] == 3
    np.testing.assert_allclose(a.star_epoch, 2024.0)
    for s in range(3):
        assert a.star_ref[s] == a.source_index[a.star == s][0]


def test_two_stars_claiming_one_reference_nearest_wins():
    ra, dec = three_stars()
    ra2, dec2 = np.r_[ra, offset(ra[0], dec[0], 0.6, 0.0)[0]], np.r_[dec, dec[0]]  # 0.6" from star 0
    data = make_data({1: (ra2, dec2), 2: (ra2, dec2)}, ra, dec)
    a = associate(data, FitConfig(match_radius_arcsec=0.3))
    assert a.n_stars == 4 and a.counts["reference_stars_matched"] == 3
    star_of_src3 = a.star[a.source_index == 3][0]
    star_of_src0 = a.star[a.source_index == 0][0]
    assert a.star_ref[star_of_src3] == -1 and a.star_ref[star_of_src0] == 0


def test_error_no_detection_selected():
    ra, dec = three_stars()
    data = make_data({1: (ra, dec), 2: (ra, dec)}, ra, dec, snr=5.0)
    with pytest.raises(InputError, match="no detection passes.*min_snr"):
        associate(data, FitConfig(min_snr=10.0))


def test_error_single_visit():
    ra, dec = three_stars()
    data = make_data({1: (ra, dec)}, ra, dec)
    with pytest.raises(InputError, match="fewer than 2 visits"):
        associate(data, FitConfig())


def test_error_visits_do_not_overlap():
    ra, dec = three_stars()
    data = make_data({1: (ra, dec), 2: offset(ra, dec, 20.0, 0.0)}, ra, dec)
    with pytest.raises(InputError, match="no star is seen in 2 or more visits.*overlap"):
        associate(data, FitConfig())


def test_error_min_measurements_unreachable():
    ra, dec = three_stars()
    data = make_data({1: (ra, dec), 2: (ra, dec)}, ra, dec)
    with pytest.raises(InputError, match="min_measurements = 3 detections"):
        associate(data, FitConfig(min_measurements=3, reference_counts=False))
    with pytest.raises(InputError, match="min_measurements = 4 points"):  # 2 detections + the reference star
        associate(data, FitConfig(min_measurements=4))


def test_error_wcs_misses_the_reference_catalog():
    ra, dec = three_stars()
    # The first-guess WCS is 30" off: everything overlaps across visits, nothing matches.
    data = make_data({1: (ra, dec), 2: (ra, dec)}, ra, dec, wcs_shift_arcsec=30.0)
    with pytest.raises(InputError) as err:
        associate(data, FitConfig())
    msg = str(err.value)
    assert "first-guess WCS probably misses the refcat" in msg
    assert "median distance" in msg and "arcsec" in msg
    assert "detections cover RA [" in msg and "reference catalog covers RA [" in msg


def test_warning_names_a_detector_visit_matching_nothing(caplog):
    ra, dec = three_stars()
    data = make_data({1: (ra, dec), 2: (ra, dec), 3: offset(ra, dec, 0.0, 40.0)}, ra, dec)
    with caplog.at_level(logging.WARNING, logger="jcal.associate"):
        a = associate(data, FitConfig())
    assert a.counts["visits"] == 2
    assert any("(visit=3, detector=0)" in r.getMessage() for r in caplog.records)
