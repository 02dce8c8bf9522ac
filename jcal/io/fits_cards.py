"""FITS header cards for jcal's WCS files, formatted here rather than through astropy's per-card
machinery (thousands of headers per fit), and header-only FITS files written from them."""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits

__all__ = ["Card", "wcs_fits_bytes", "write_wcs_fits"]


def _format_float(value: float) -> str:
    """A FITS fixed-format real of at most 20 characters, as precise as that allows."""
    value = float(value)
    text = repr(value).upper()
    if len(text) <= 20 and "." in text and "N" not in text:  # the common case, already valid
        return text
    if not np.isfinite(value):
        raise ValueError(f"a FITS header value must be finite, got {value}")
    mantissa, _, exponent = text.partition("E")
    if "." not in mantissa:
        text = mantissa + ".0" + ("E" + exponent if exponent else "")
    # too long for the value field: the most significant digits "-d.dddE+XX" holds in 20
    digits = 14 - (value < 0)
    while len(text) > 20:  # (a 3-digit exponent, or rounding up to one, takes a digit more)
        text = f"{value:.{digits}E}"
        digits -= 1
    return text


def _written(values: np.ndarray) -> np.ndarray:
    """The values as a reader will get them back from the header (20-character reals)."""
    values = np.asarray(values, np.float64)
    # a value whose shortest repr fits the field is written exactly; only the others round
    flat = [v if len(repr(v)) <= 20 and math.isfinite(v) else float(_format_float(v)) for v in values.ravel().tolist()]
    return np.array(flat, np.float64).reshape(values.shape)


def _card(key: str, value, comment: str = "") -> str:
    """One 80-character FITS header card."""
    if isinstance(value, bool):
        text = f"{'T' if value else 'F':>20}"
    elif isinstance(value, (int, np.integer)):
        text = f"{int(value):>20}"
    elif isinstance(value, str):
        text = f"{chr(39) + value.replace(chr(39), chr(39) * 2).ljust(8) + chr(39):<20}"
    else:
        text = f"{_format_float(value):>20}"
    card = f"{key:<8}= {text}" + (f" / {comment}" if comment else "")
    if len(key) > 8 or len(f"{key:<8}= {text}") > 80:
        raise ValueError(f"FITS card {key!r} = {value!r} does not fit 80 characters")
    return card[:80].ljust(80)


Card = tuple[str, Any, str]  # (keyword, value, comment)


def wcs_fits_bytes(cards: list[Card]) -> bytes:
    """A header-only FITS file holding `cards`.

    A data-less primary HDU has a zero-length axis, so the detector size moves from NAXIS1/NAXIS2
    to IMAGEW/IMAGEH (the astrometry.net convention for WCS-only files). NAXIS stays 2 (with
    NAXIS1 = NAXIS2 = 0: no data) so that readers do not warn about a WCS with more axes than
    its image.
    """
    renamed = {"NAXIS1": "IMAGEW", "NAXIS2": "IMAGEH"}
    lines = [_card("SIMPLE", True, "conforms to FITS standard"), _card("BITPIX", 8, "array data type"),
             _card("NAXIS", 2, "number of array dimensions"), _card("NAXIS1", 0, "no data: size in IMAGEW"),
             _card("NAXIS2", 0, "no data: size in IMAGEH"), _card("EXTEND", True)]
    lines += [_card(renamed.get(k, k), v, "detector size, pixels" if k in renamed else c) for k, v, c in cards
              if k not in ("SIMPLE", "BITPIX", "NAXIS", "EXTEND", "END")]
    text = "".join(lines) + "END".ljust(80)
    return (text + " " * (-len(text) % 2880)).encode("ascii")


def write_wcs_fits(header: fits.Header | list[Card], path: str | os.PathLike) -> None:
    """Write a WCS header (or its cards) as a header-only FITS file, atomically (temp + rename)."""
    cards = [(c.keyword, c.value, c.comment) for c in header.cards] if isinstance(header, fits.Header) else header
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(wcs_fits_bytes(cards))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; the result should look like any file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
