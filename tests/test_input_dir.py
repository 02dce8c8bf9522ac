"""The input directory format: round trip, every InputError case, and atomic output directories."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from astropy.io import fits
from astropy.table import Table

from jcal.data import InputError
from jcal.io import atomic_output_dir, read_input, write_input
from jcal.simulate import simulate


@pytest.fixture(scope="module")
def sim():
    return simulate("tiny", seed=0)


@pytest.fixture(scope="module")
def written(sim, tmp_path_factory):
    return write_input(sim.data, tmp_path_factory.mktemp("in") / "input")


@pytest.fixture
def indir(written, tmp_path):
    """A fresh, writable copy of the written input directory."""
    return shutil.copytree(written, tmp_path / "copy")


def _edit_parquet(path, edit):
    table = pq.read_table(path)
    pq.write_table(edit(table), path)


def _set_column(table: pa.Table, name: str, values) -> pa.Table:
    i = table.column_names.index(name)
    return table.set_column(i, name, pa.array(values))


def _a_wcs_file(indir):
    return sorted((indir / "wcs").glob("*.fits"))[0]


# -- round trip -------------------------------------------------------------------------------


def test_round_trip(sim, written):
    data = read_input(written)
    for name in ("visit", "detector", "x", "y", "x_err", "y_err", "inst_flux", "inst_flux_err", "source_id"):
        np.testing.assert_array_equal(getattr(data.sources, name), getattr(sim.data.sources, name), err_msg=name)
    for name in ("ref_id", "ra", "dec", "ra_err", "dec_err", "epoch", "pmra", "pmdec", "pmra_err", "pmdec_err"):
        np.testing.assert_array_equal(getattr(data.refcat, name), getattr(sim.data.refcat, name), err_msg=name)
    for band, (f, e) in sim.data.refcat.fluxes.items():
        np.testing.assert_array_equal(data.refcat.fluxes[band][0], f)
        np.testing.assert_array_equal(data.refcat.fluxes[band][1], e)
    for name in ("visit", "mjd", "band", "exptime", "airmass"):
        np.testing.assert_array_equal(getattr(data.visits, name), getattr(sim.data.visits, name), err_msg=name)
    for name in ("detector", "focal_x", "focal_y", "nx", "ny", "pixel_scale"):
        np.testing.assert_array_equal(getattr(data.camera, name), getattr(sim.data.camera, name), err_msg=name)
    assert data.ccd_visits.keys() == sim.data.ccd_visits.keys()
    px = np.random.default_rng(0).uniform(-0.5, 1023.5, (50, 2))
    for key, ccd in data.ccd_visits.items():
        ref = sim.data.ccd_visits[key]
        assert (ccd.nx, ccd.ny) == (ref.nx, ref.ny)
        diff = ccd.wcs.all_pix2world(px, 0) - ref.wcs.all_pix2world(px, 0)
        assert np.abs(diff).max() * 3600 < 1e-6


def test_written_layout(written):
    names = {p.name for p in written.iterdir()}
    assert names == {"sources.parquet", "refcat.parquet", "visits.ecsv", "camera.ecsv", "wcs", "jcal_manifest.json"}
    assert not [p for p in written.parent.iterdir() if p.name.startswith(".")]  # no temp leftovers
    assert len(list((written / "wcs").glob("*_*.fits"))) == 16


def test_flags_drop_rows_and_extra_columns_ignored(indir, caplog):
    n = pq.read_metadata(indir / "sources.parquet").num_rows
    flags = np.zeros(n, dtype=np.int64)
    flags[:7] = 4
    _edit_parquet(indir / "sources.parquet", lambda t: t.append_column("flags", pa.array(flags))
                  .append_column("junk", pa.array([[1, 2]] * n)))
    with caplog.at_level(logging.INFO, logger="jcal.io"):
        data = read_input(indir)
    assert len(data.sources) == n - 7
    assert data.sources.source_id[0] == 7
    assert any("dropped 7" in r.getMessage() for r in caplog.records)


# -- errors ------------------------------------------------------------------------------------


def test_missing_column_names_it_and_suggests(indir):
    _edit_parquet(indir / "sources.parquet", lambda t: t.rename_columns(
        ["xerr" if c == "xErr" else c for c in t.column_names]))
    with pytest.raises(InputError) as err:
        read_input(indir)
    msg = str(err.value)
    assert "sources.parquet" in msg and "'xErr'" in msg and "did you mean 'xerr'" in msg
    assert "available columns" in msg and "'instFlux'" in msg


@pytest.mark.parametrize("table, column, row, message", [
    ("sources.parquet", "y", 3, r"sources\.parquet.*'y'.*NaN"),
    ("refcat.parquet", "dec_err", 0, r"refcat\.parquet.*'dec_err'"),
])
def test_nan_in_required_column(indir, table, column, row, message):
    def edit(t):
        x = t.column(column).to_numpy().copy()
        x[row] = np.nan
        return _set_column(t, column, x)

    _edit_parquet(indir / table, edit)
    with pytest.raises(InputError, match=message):
        read_input(indir)


@pytest.mark.parametrize("name", ["sources.parquet", "refcat.parquet", "visits.ecsv"])
def test_missing_file(indir, name):
    (indir / name).unlink()
    with pytest.raises(InputError, match=name.replace(".", r"\.")):
        read_input(indir)


def test_missing_directory(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read_input(tmp_path / "nope")


def test_missing_wcs_file(indir):
    path = _a_wcs_file(indir)
    path.unlink()
    with pytest.raises(InputError, match=path.name):
        read_input(indir)


def test_non_celestial_wcs(indir):
    path = _a_wcs_file(indir)
    header = fits.Header({"CTYPE1": "LINEAR", "CTYPE2": "LINEAR", "CRPIX1": 1.0, "CRPIX2": 1.0,
                          "CRVAL1": 0.0, "CRVAL2": 0.0, "CDELT1": 1.0, "CDELT2": 1.0})
    fits.PrimaryHDU(header=header).writeto(path, overwrite=True)
    with pytest.raises(InputError, match=f"{path.name}.*not celestial"):
        read_input(indir)


def test_wcs_file_not_fits(indir):
    path = _a_wcs_file(indir)
    path.write_text("import os  # not FITS\n")
    with pytest.raises(InputError, match=path.name):
        read_input(indir)


def test_detector_size_sources(sim, indir):
    """NAXISn of an image header, else IMAGEW/IMAGEH, else camera.ecsv, else an error."""
    path = _a_wcs_file(indir)
    header = fits.getheader(path)
    del header["IMAGEW"], header["IMAGEH"]
    fits.PrimaryHDU(header=header).writeto(path, overwrite=True)
    data = read_input(indir)  # from camera.ecsv
    key = tuple(int(v) for v in path.stem.split("_"))
    assert (data.ccd_visits[key].nx, data.ccd_visits[key].ny) == (1024, 1024)

    image = fits.ImageHDU(np.zeros((3, 5), dtype=np.uint8), header=header)  # NAXIS1=5, NAXIS2=3
    fits.HDUList([fits.PrimaryHDU(), image]).writeto(path, overwrite=True)
    data = read_input(indir)
    assert (data.ccd_visits[key].nx, data.ccd_visits[key].ny) == (5, 3)

    fits.PrimaryHDU(header=header).writeto(path, overwrite=True)
    (indir / "camera.ecsv").unlink()
    with pytest.raises(InputError, match=f"{path.name}.*detector size"):
        read_input(indir)


def test_refcat_magnitudes_and_metadata_epoch(sim, indir):
    ref = sim.data.refcat
    mag = -2.5 * np.log10(ref.fluxes["r"][0]) + 31.4
    table = pa.table({"ra": ref.ra, "dec": ref.dec, "ra_err": ref.ra_err, "dec_err": ref.dec_err,
                      "r_mag": mag, "r_mag_err": np.full(len(ref), 0.01)})
    pq.write_table(table.replace_schema_metadata({"epoch": "2016.0"}), indir / "refcat.parquet")
    data = read_input(indir)
    np.testing.assert_allclose(data.refcat.fluxes["r"][0], ref.fluxes["r"][0], rtol=1e-12)
    np.testing.assert_allclose(data.refcat.fluxes["r"][1], ref.fluxes["r"][0] * 0.4 * np.log(10) * 0.01,
                               rtol=1e-12)
    assert np.all(data.refcat.epoch == 2016.0) and not data.refcat.has_proper_motion.any()
    np.testing.assert_array_equal(data.refcat.ref_id, np.arange(len(ref)))

    pq.write_table(table, indir / "refcat.parquet")
    with pytest.raises(InputError, match=r"refcat\.parquet.*epoch"):
        read_input(indir)


def test_fits_and_parquet_table_variants(sim, indir):
    (indir / "visits.ecsv").rename(indir / "keep.ecsv")
    visits = Table.read(indir / "keep.ecsv")
    pq.write_table(pa.table({c: np.asarray(visits[c]) for c in visits.colnames}), indir / "visits.parquet")
    sources = pq.read_table(indir / "sources.parquet")
    Table({c: sources.column(c).to_numpy() for c in sources.column_names}).write(indir / "sources.fits")
    (indir / "sources.parquet").unlink()
    data = read_input(indir)
    np.testing.assert_array_equal(data.sources.x, sim.data.sources.x)
    np.testing.assert_array_equal(data.visits.band, sim.data.visits.band)
    # Two variants of one table is ambiguous: refuse rather than guess.
    (indir / "keep.ecsv").rename(indir / "visits.ecsv")
    with pytest.raises(InputError, match="ambiguous"):
        read_input(indir)


def test_visit_missing_for_sources(indir):
    t = Table.read(indir / "visits.ecsv")
    t[1:].write(indir / "visits.ecsv", overwrite=True)
    with pytest.raises(InputError, match="visit"):
        read_input(indir)


# -- atomic output directories -------------------------------------------------------------------


def _leftovers(parent):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_atomic_success(tmp_path):
    with atomic_output_dir(tmp_path / "out") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.tmp-")
        (tmp / "a.txt").write_text("x")
        assert not (tmp_path / "out").exists()
    assert (tmp_path / "out" / "a.txt").read_text() == "x"
    assert _leftovers(tmp_path) == []


def test_atomic_exception_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_output_dir(tmp_path / "out") as tmp:
            (tmp / "a.txt").write_text("x")
            raise RuntimeError("boom")
    assert not (tmp_path / "out").exists()
    assert _leftovers(tmp_path) == []


def test_atomic_existing_not_overwritten(tmp_path):
    out = tmp_path / "out"
    with atomic_output_dir(out) as tmp:  # a previous jcal output (replaceable; a foreign folder is not)
        (tmp / "old.txt").write_text("old")
    with pytest.raises(FileExistsError):
        with atomic_output_dir(out):
            pytest.fail("the block must not run")
    assert (out / "old.txt").read_text() == "old"

    with pytest.raises(RuntimeError):  # a failed overwrite keeps the old output
        with atomic_output_dir(out, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new")
            raise RuntimeError("boom")
    assert sorted(p.name for p in out.iterdir()) == ["jcal_manifest.json", "old.txt"]

    with atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["jcal_manifest.json", "new.txt"]
    assert _leftovers(tmp_path) == []


def test_write_input_refuses_existing(sim, written, tmp_path):
    with pytest.raises(FileExistsError):
        write_input(sim.data, written)
    out = write_input(sim.data, tmp_path / "again")
    write_input(sim.data, out, overwrite=True)
    assert len(read_input(out).sources) == len(sim.data.sources)


def test_sip_headers_parsed_by_jcal_match_astropy(tmp_path):
    """TAN-SIP headers (A/B and AP/BP) are read with jcal's own SIP parse (faster); the WCS must
    be the one astropy builds from the whole header, forward and inverse."""
    from astropy.wcs import WCS

    from jcal.io.input_dir import _read_wcs, _split_sip
    from jcal.io.sip import fit_tan_sip, write_wcs_fits

    def distorted(x, y):  # a smooth, non-linear map about (150, 2) deg, 0.2"/px
        u, v = (x - 1000) / 1000, (y - 2000) / 2000
        return 150 + (0.2 / 3600) * (x - 1000 + 3 * u * v + 2 * u**2) / np.cos(np.radians(2)), \
            2 + (0.2 / 3600) * (y - 2000 + 4 * v**2 - u * v)

    header, _ = fit_tan_sip(distorted, 2048, 4096, crval=(150.0, 2.0), order=3, grid=12)
    path = tmp_path / "1_2.fits"
    write_wcs_fits(header, path)
    text = fits.getheader(path).tostring()
    assert _split_sip(text) is not None and _split_sip(text)[1][2] is not None  # A, B, AP, BP parsed
    fast, nx, ny = _read_wcs(path, {}, 2)
    reference = WCS(fits.getheader(path), relax=True)
    rng = np.random.default_rng(1)
    x, y = rng.uniform(-0.5, nx - 0.5, 100), rng.uniform(-0.5, ny - 0.5, 100)
    np.testing.assert_array_equal(fast.all_pix2world(x, y, 0), reference.all_pix2world(x, y, 0))
    ra, dec = reference.all_pix2world(x, y, 0)
    np.testing.assert_array_equal(fast.wcs_world2pix(ra, dec, 0), reference.wcs_world2pix(ra, dec, 0))
    np.testing.assert_allclose(fast.all_world2pix(ra, dec, 0), np.stack([x, y]), atol=1e-6)
    # anything unusual in the SIP cards: astropy parses the whole header
    cards = [text[i:i + 80] for i in range(0, len(text), 80)]
    odd = "".join(c[:10] + "'three'".ljust(20) + c[30:] if c.startswith("A_ORDER") else c for c in cards)
    assert _split_sip(odd) is None
    assert _split_sip(text.replace("'RA---TAN-SIP'", "'RA---TAN'    ")) is None
