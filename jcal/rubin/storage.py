"""Butler storage for the afw-format FITS files jcal reads (visitSummary, refcat shards).

What: the storage class ``JcalFits`` (Python type ``astropy.io.fits.HDUList``) with its formatter
`FitsHDUListFormatter`, declared in ``butler_seed.yaml`` (`SEED_CONFIG`), which a repository
takes at creation (``butler create REPO --seed-config SEED_CONFIG``); an existing repository
gets its two sections added to its ``butler.yaml``. Where afw is installed, ``ExposureCatalog``/``SimpleCatalog``
datasets (the standard ``visitSummary`` and refcat dataset types) convert to ``JcalFits`` through
`afw_catalog_to_hdulist`, so jcal's connections accept them as they are registered.

Why: afw is not on PyPI, so its catalog types cannot be read here; the files themselves are plain
FITS that jcal's own readers (`jcal.io.lsst_wcs`, `jcal.io.lsst_refcat`) decode with astropy.
Reading never executes code from the file.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from astropy.io import fits
from lsst.daf.butler import FormatterV2
from lsst.resources import ResourcePath

from ..io.lsst_objects import afw_catalog_to_hdulist, hdulist_from_bytes

__all__ = ["SEED_CONFIG", "FitsHDUListFormatter", "afw_catalog_to_hdulist", "hdulist_from_bytes"]

SEED_CONFIG = Path(__file__).resolve().parent / "butler_seed.yaml"


class FitsHDUListFormatter(FormatterV2):
    """Reads/writes a whole FITS file as an ``astropy.io.fits.HDUList``."""

    default_extension = ".fits"
    supported_extensions = frozenset({".fits", ".fit"})
    unsupported_parameters = None  # no read parameters
    can_read_from_uri = True

    def read_from_uri(self, uri: ResourcePath, component: str | None = None, expected_size: int = -1) -> Any:
        return hdulist_from_bytes(uri.read())

    def to_bytes(self, in_memory_dataset: Any) -> bytes:
        if not isinstance(in_memory_dataset, fits.HDUList):
            raise TypeError(f"JcalFits datasets are astropy.io.fits.HDUList, not {type(in_memory_dataset)}")
        buf = io.BytesIO()
        in_memory_dataset.writeto(buf)
        return buf.getvalue()
